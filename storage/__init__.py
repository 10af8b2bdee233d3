"""Shared storage infrastructure: database URLs, the eventsourcing persistence environment,
connections and the start-up DDL lock. Imports none of the service's packages, so every wing
(projections, scheduler, legacy, the composition root) may import it."""

from storage.urls import is_postgres, postgres_conninfo, postgres_parts, sqlite_path
from storage.environment import ddl_lock, ensure_postgres_schema, persistence_env

__all__ = ["ddl_lock", "ensure_postgres_schema", "is_postgres", "persistence_env",
           "postgres_conninfo", "postgres_parts", "sqlite_path"]
