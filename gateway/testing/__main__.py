"""``python -m gateway.testing [--port 8001] [--delay 0.05]``: serve the OpenAI-compatible upstream stub (for benchmarks)."""

from gateway.testing.upstream import main

main()
