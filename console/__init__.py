"""The auditor console: read-only web pages under `/console` for `auditor` and `admin` keys.

Server-rendered (Jinja2) pages over the service's existing read side: the session resource
(api/statements.py), the live and as-of balances and wallets (api/routes.py, api/audit_routes.py,
audit/), statements (audit/statements.py), the audit digest and lags. Plots are server-side SVG
(pygal; the session timeline is drawn by a small template). No write action; docs/console.md.

`install(app)` mounts the pages and their static files on an app built by api/app.py; the
composition root (runtime/asgi.py) calls it.
"""

from __future__ import annotations

from console.routes import install

__all__ = ["install"]
