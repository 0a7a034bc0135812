"""The admin dashboard: server-rendered pages over the same queries as ``gateway jobs`` and ``/metrics``.

Off unless the configuration has an ``admin:`` section. Pages are Jinja2 templates with autoescaping;
the live parts are a few lines of plain JavaScript (``static/admin.js``), so there is no build step.
"""
