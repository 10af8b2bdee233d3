"""Call-provider adapters: signed callbacks → ledger presence events (docs/providers.md).

The registry below is the only place that names the providers. Dropping one is deleting its
module and its line here; api/webhooks.py builds one route per entry.
"""

from __future__ import annotations

from importlib import import_module

from api.providers.base import Ignored, LedgerEvent, Provider, WebhookRequest

_MODULES = (
    "api.providers.twilio_voice",
    "api.providers.twilio_video",  # Twilio Programmable Video ends service on 2026-12-05
    "api.providers.livekit",
)

PROVIDERS: tuple[Provider, ...] = tuple(import_module(name).PROVIDER for name in _MODULES)

__all__ = ["PROVIDERS", "Ignored", "LedgerEvent", "Provider", "WebhookRequest"]
