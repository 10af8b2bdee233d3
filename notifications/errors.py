"""Refusals of the webhook endpoints and deliveries API, registered in the one error-code
registry (ledger/errors.py ERROR_CODES) like every other code."""

from __future__ import annotations

from ledger.errors import error_type

UnknownWebhookEndpoint = error_type(
    "UnknownWebhookEndpoint", "unknown_webhook_endpoint", 404, "Unknown webhook endpoint",
    when="no webhook endpoint has this id")
UnknownWebhookDelivery = error_type(
    "UnknownWebhookDelivery", "unknown_webhook_delivery", 404, "Unknown webhook delivery",
    when="no webhook delivery has this id")
WebhookUrlNotAllowed = error_type(
    "WebhookUrlNotAllowed", "webhook_url_not_allowed", 422,
    "The webhook URL is not allowed",
    when="a webhook endpoint URL that is not `https://` (plain `http://` only for hosts in "
         "`LEDGER_WEBHOOK_ALLOW_HTTP_HOSTS`), or carries a user name or password")
