"""The PostgreSQL backend (``queue: {backend: postgres, dsn: ...}``): one database that every
gateway node shares, and nothing else.

- :mod:`.database`: the driver (asyncpg, an optional extra), one connection pool per process,
  errors sorted into "this item" and "the database";
- :mod:`.schema`: versioned migrations, applied at start under an advisory lock;
- :mod:`.queue`: the job queue (claims with ``FOR UPDATE SKIP LOCKED``, wake-ups by ``LISTEN/NOTIFY``);
- :mod:`.files`: hosted images as ``bytea``, served by any node;
- :mod:`.tokens`: generated engine tokens, the same on every node.

Why PostgreSQL and asyncpg: ``docs/postgres.md``.
"""
