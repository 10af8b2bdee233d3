"""Shared storage infrastructure: database URLs, the eventsourcing persistence environment,
connections, the start-up DDL lock and the fail-fast availability gate. Imports none of the
service's packages, so every wing (projections, scheduler, legacy, api, the composition root)
may import it."""

from storage.urls import (is_postgres, postgres_conninfo, postgres_parts, redacted_url,
                          sqlite_path)
from storage.availability import (StoreGate, StoreUnavailable, connect_options, gate_for,
                                  is_unavailable, probe_store)
from storage.environment import ddl_lock, ensure_postgres_schema, persistence_env
from storage.gated_postgres import pool_usage

__all__ = ["StoreGate", "StoreUnavailable", "connect_options", "ddl_lock",
           "ensure_postgres_schema", "gate_for", "is_postgres", "is_unavailable",
           "persistence_env", "pool_usage", "probe_store", "postgres_conninfo", "postgres_parts", "redacted_url",
           "sqlite_path"]
