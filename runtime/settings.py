"""Typed configuration from `LEDGER_*` environment variables (pydantic-settings)."""

from __future__ import annotations

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from ledger.rules import Policy

DEV_API_KEYS = "dev-backend:backend,dev-auditor:auditor,dev-admin:admin"


class Settings(BaseSettings):
    """Service settings. Durations in seconds; `database_url` is `sqlite:///path` or
    `postgresql://user[:password]@host[:port]/db[?schema=name]`."""

    model_config = SettingsConfigDict(env_prefix="LEDGER_", extra="ignore")

    database_url: str = "sqlite:///./var/ledger.db"
    api_keys: str = Field(DEV_API_KEYS,
                          description="comma-separated key:role (backend|auditor|admin|metrics)")
    host: str = "127.0.0.1"
    port: int = 8000
    tick_enabled: bool = True
    tick_seconds: int = Field(30, ge=1, le=3600)
    clock: str = Field("system", pattern="^(system|manual)$")
    skew_seconds: int = Field(60, ge=0, le=3600)
    settlement_grace_seconds: int = Field(600, ge=0, le=86400)
    max_duration_seconds: int = Field(3 * 3600, ge=600, le=86400)
    batch_limit: int = Field(100, ge=1, le=100)
    aggregate_cache_size: int = Field(20_000, ge=0, le=1_000_000, description=(
        "aggregates kept in memory per process, brought up to date from the store on every "
        "load (a version-checked cache; 0: off, every load replays the whole history)"))
    snapshot_interval: int = Field(20, ge=0, le=100_000, description=(
        "events between snapshots of a long-lived aggregate (pool, patient, doctor, wallet, "
        "money wallet, price list): a cold load reads the latest snapshot and the events after "
        "it (0: off, none written or read; docs/design.md, Write path)"))
    group_commit_max: int = Field(32, ge=1, le=100, description=(
        "single events posted concurrently are decided and saved together, at most this many "
        "per unit of work (ledger/group_commit.py; 1: each its own unit)"))
    withdrawal_minimums: dict[str, int] = Field(
        default_factory=lambda: {"MWK": 5_000_000, "USD": 7_000},
        description="minimum withdrawal per ISO 4217 currency, in minor units, as JSON "
                    '(\'{"MWK": 5000000, "USD": 7000}\', the legacy 50,000.00 MWK and 70.00 USD); '
                    "a currency not listed has none; below it: 422 withdrawal_below_minimum")
    audit_enabled: bool = Field(True, description=(
        "keep the hash chains and the as-of history caught up in the background (docs/audit.md)"))
    audit_poll_seconds: float = Field(1.0, ge=0.05, le=60, description=(
        "how often the audit follower looks for newly committed events"))
    log_level: str = Field("info", pattern="^(debug|info|warning|error|critical)$")
    log_format: str = Field("json", pattern="^(json|console)$",
                            description="json: one JSON object per line (structlog); console: for a terminal")
    # Operating under failure and load (docs/operations.md, "Limits").
    store_timeout_seconds: int = Field(
        3, ge=1, le=60, description="bound on waiting for a database connection; while the "
                                    "store is unreachable requests answer 503 retry_later within about this")
    retry_after_seconds: int = Field(2, ge=1, le=300,
                                     description="Retry-After of a 503 retry_later while the store is unreachable")
    startup_wait_seconds: int = Field(60, ge=0, le=3600,
                                      description="how long start-up waits for the database before giving up")
    max_body_bytes: int = Field(1_048_576, ge=1024, le=64 * 1_048_576,
                                description="request bodies larger than this answer 413 payload_too_large")
    header_timeout_seconds: float = Field(10, gt=0, le=300,
                                          description="a connection that has not sent complete request headers by then is closed")
    keepalive_timeout_seconds: int = Field(5, ge=1, le=300,
                                           description="an idle kept-alive connection is closed after this")
    max_connections: int = Field(512, ge=1, le=100_000,
                                 description="open connections per worker process; more are answered 503 and closed")
    projection_poll_seconds: float = Field(0.5, ge=0.01, le=60, description=(
        "the background projector catches up after each write in its process, on a PostgreSQL "
        "NOTIFY from any process, and at least this often"))
    follower_coalesce_seconds: float = Field(0.02, ge=0, le=1, description=(
        "after a catch-up that found less than a full page, the projector and the webhook "
        "deriver wait this long before the next one, so a stream of small writes is applied "
        "in pages instead of one catch-up per write (0: at once); reads that wait for their "
        "own writes wait at most this much longer"))
    followers: str = Field("auto", pattern="^(auto|process|inline)$", description=(
        "where `ledger serve` runs the projector, the webhook notifier and the audit follower: "
        "process: one child process beside the request workers (runtime/followers.py); "
        "inline: threads of each worker; auto: process on PostgreSQL with the system clock, "
        "else inline"))
    read_wait_seconds: float = Field(2.0, ge=0, le=30, description=(
        "a read of a projection waits at most this long for it to reach `min_position` (by "
        "default the head when the read began), then answers 503 projections_behind"))
    ready_max_lag_events: int = Field(10_000, ge=0,
                                      description="/readyz fails while a projection lags more events than this")
    ready_max_lag_seconds: float = Field(60, ge=0,
                                         description="/readyz fails while the oldest unapplied event is older than this")
    # Call providers (docs/providers.md). An endpoint whose provider is unset answers 503.
    public_base_url: str | None = Field(
        None, pattern=r"^https?://[^/?#]+(/[^?#]*)?$",
        description="the scheme://host[/prefix] the providers call (signed by Twilio); "
                    "never taken from the request, which a proxy may have rewritten")
    twilio_auth_token: SecretStr | None = None
    # Outbound webhooks (docs/webhooks.md).
    webhook_delivery_enabled: bool = Field(
        True, description="derive and send webhooks in this process (false: only the API "
                          "manages endpoints; run `ledger notify` somewhere)")
    webhook_allow_http_hosts: str = Field(
        "", description="comma-separated hosts that may receive webhooks over plain http "
                        "(loopback receivers in tests); every other endpoint must be https")
    webhook_balance_low_units: int = Field(
        1, ge=0, le=1000, description="balance.low is sent when a patient's available units "
                                      "of a bucket fall to this, and again at zero")
    webhook_concurrency: int = Field(8, ge=1, le=256, description="webhook requests in flight per process")
    webhook_per_endpoint: int = Field(4, ge=1, le=256,
                                      description="of which at most this many to one endpoint")
    webhook_timeout_seconds: float = Field(10, gt=0, le=120, description="per webhook request")
    webhook_retry_base_seconds: float = Field(5, gt=0, le=3600,
                                              description="first retry delay (doubling, jittered)")
    webhook_retry_max_seconds: float = Field(6 * 3600, gt=0, le=7 * 86400,
                                             description="the retry delay stops doubling here")
    webhook_retry_for_seconds: float = Field(3 * 86400, gt=0, le=30 * 86400,
                                             description="then a delivery is dead-lettered")
    webhook_response_cap_bytes: int = Field(1024, ge=0, le=65536,
                                            description="response body bytes read and kept")
    webhook_claim_margin_seconds: float = Field(
        30, gt=0, le=3600, description="a delivery whose sender died is sent again this long "
                                       "after its request's timeout")
    livekit_api_key: str | None = None
    livekit_api_secret: SecretStr | None = None
    # The auditor console (docs/console.md).
    console_secret: SecretStr | None = Field(
        None, description="signs the console's session cookies; unset: derived from "
                          "LEDGER_API_KEYS (every worker derives the same; changing the keys "
                          "ends every console session)")
    console_cookie_secure: bool = Field(
        True, description="mark the console's session cookie Secure (browsers keep it on "
                          "https and on http://localhost / 127.0.0.1); false only behind a "
                          "plain-http proxy you trust")

    def secrets(self) -> list[str]:
        """Every configured secret (API keys, provider credentials, database password): log
        lines never contain them (observability/logs.py masks them)."""
        from storage import postgres_parts, is_postgres

        values = list(self.api_key_roles())
        values += [s.get_secret_value() for s in (self.twilio_auth_token, self.livekit_api_secret,
                                                  self.console_secret) if s]
        if is_postgres(self.database_url):
            values.append(postgres_parts(self.database_url)["password"])
        return [v for v in values if v and len(v) >= 4]

    @field_validator("withdrawal_minimums")
    @classmethod
    def _currencies_and_amounts(cls, value: dict[str, int]) -> dict[str, int]:
        for currency, minimum in value.items():
            if len(currency) != 3 or not currency.isalpha() or not currency.isupper():
                raise ValueError(f"{currency!r} is not an ISO 4217 code")
            if minimum < 0:
                raise ValueError(f"the {currency} minimum is negative")
        return value

    def notifier_config(self):
        """The NotifierConfig these settings select (notifications/, docs/webhooks.md)."""
        from datetime import timedelta

        from notifications import DeliveryPolicy, NotifierConfig

        hosts = frozenset(h.strip().lower() for h in self.webhook_allow_http_hosts.split(",")
                          if h.strip())
        policy = DeliveryPolicy(
            concurrency=self.webhook_concurrency, per_endpoint=self.webhook_per_endpoint,
            timeout_seconds=self.webhook_timeout_seconds,
            response_cap_bytes=self.webhook_response_cap_bytes,
            retry_base_seconds=self.webhook_retry_base_seconds,
            retry_max_seconds=self.webhook_retry_max_seconds,
            retry_for=timedelta(seconds=self.webhook_retry_for_seconds),
            claim_margin_seconds=self.webhook_claim_margin_seconds)
        return NotifierConfig(balance_low_units=self.webhook_balance_low_units,
                              public_base_url=self.public_base_url or "",
                              allow_http_hosts=hosts, policy=policy,
                              coalesce_seconds=self.follower_coalesce_seconds)

    def followers_in_child(self) -> bool:
        """Whether `ledger serve` runs the followers in a child process (`followers`): never
        with a manual clock (the child's clock could not follow the API's `PUT /v1/clock`)
        nor on SQLite under `auto` (no NOTIFY: the child would only poll)."""
        if self.clock == "manual" or self.followers == "inline":
            return False
        return self.followers == "process" or self.database_url.startswith("postgres")

    def policy(self) -> Policy:
        """The billing Policy these settings select (billing-rules.md §3, §8)."""
        return Policy(skew_seconds=self.skew_seconds,
                      settlement_grace_seconds=self.settlement_grace_seconds,
                      max_duration_seconds=self.max_duration_seconds)

    def api_key_roles(self) -> dict[str, str]:
        """Map of API key → role parsed from `api_keys`; raises ValueError on a bad entry."""
        roles = {}
        for item in filter(None, (part.strip() for part in self.api_keys.split(","))):
            key, _, role = item.rpartition(":")
            if not key or role not in ("backend", "auditor", "admin", "metrics"):
                raise ValueError(f"bad LEDGER_API_KEYS entry {item!r}")
            roles[key] = role
        return roles
