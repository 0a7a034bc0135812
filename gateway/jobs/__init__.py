"""Jobs: the durable record of every accepted request and the queue protocol that holds it, with
the embedded SQLite queue (the PostgreSQL queue is in :mod:`gateway.postgres`).

The queue knows nothing of HTTP, routing or files; ``gateway.worker`` drives jobs through it."""
