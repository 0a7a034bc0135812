"""Usage of the OpenAI-compatible API per UTC day, API key and engine, and the report that joins it
with the portal's finished jobs.

- :mod:`.ledger`: :class:`~gateway.usage.ledger.ApiUsageLedger` counts each ``/v1`` request in
  memory (no I/O on the request path) and adds the counts to its store every few seconds;
  the store protocol and the stored row;
- :mod:`.sqlite`: the store in ``data_dir/usage.sqlite3`` (PostgreSQL's is in :mod:`gateway.postgres.usage`);
- :mod:`.report`: pure functions: portal jobs and API rows as one kind of row, totals per day, CSV.

``gateway usage`` and the admin dashboard read the same rows through the same functions.
"""
