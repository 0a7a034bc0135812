"""Bitrix24 app mode: one gateway serves many portals that install it (``app:`` in the config).

- :mod:`.model`: an installed portal (a tenant) and its states;
- :mod:`.events`: the portal's install and uninstall events (form-encoded, PHP bracket keys)
  turned into typed values, every field bounded;
- :mod:`.store`: the tenant store protocol and its SQLite implementation (PostgreSQL's is in
  :mod:`gateway.postgres.tenants`);
- :mod:`.oauth`: Bitrix's OAuth server: ``app.info`` and token refresh;
- :mod:`.service`: install, uninstall, tokens refreshed once under a per-portal lock, engines
  registered on the portal in the background, the tenant a completions URL names.

Webhook mode (one portal, engines registered with the CLI) works unchanged beside it.
The protocol facts are in ``docs/app-mode.md``.
"""
