"""Jobs: the durable record of every accepted request, the queue that holds them and the worker."""
