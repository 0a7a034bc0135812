"""Jobs: the durable record of every accepted request and the queue that holds it (SQLite today).

The queue knows nothing of HTTP, routing or files; ``gateway.worker`` drives jobs through it."""
