"""Generated stores kept as templates, and a fresh copy of one for each timed round: the tick
rows (bench/targets.py) time several ticks on one generated store, alternating the store
without history and the one with it, so that a row's figure is a mean and its spread shows
(one tick of each moved the history row's slowdown between −3 % and −26 % on the same code:
docs/benchmarks.md, the seventh and eighth stops).

On PostgreSQL a template is a database of its own (the generated store in its schema `bench`)
and a copy is `CREATE DATABASE … TEMPLATE … STRATEGY FILE_COPY` (PostgreSQL 15 and later; the
server's files are copied after a checkpoint, so the copy writes no WAL that the timed tick
would then checkpoint); the URL's role must be allowed to create databases. On SQLite a template
is a file and a copy is a copy of that file. Copies and templates are dropped when done.
"""

from __future__ import annotations

import shutil
import uuid
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Iterator
from urllib.parse import urlparse

from bench.stores import StoreInfo
from storage import postgres_conninfo, postgres_parts, sqlite_path

SCHEMA = "bench"  # the generated store's schema inside a template database


class Templates:
    """Empty stores to generate into (`new`), their copies (`copy`), and the cleanup (`close`)
    of every template made. `postgres_url`: a database URL on the server the templates are
    made on (its own database is not touched); `workdir`: where SQLite files go."""

    def __init__(self, postgres_url: str, workdir: Path) -> None:
        self.postgres_url, self.workdir = postgres_url, workdir
        self._made: list[str] = []  # URLs of the templates, to drop at close

    def new(self, store: str) -> str:
        """The URL of a new empty store to generate a template into: a PostgreSQL database
        (store "postgres") or a SQLite file; dropped by `close`."""
        url = self._create_database() if store == "postgres" else self._new_file()
        self._made.append(url)
        return url

    @contextmanager
    def copy(self, template: StoreInfo) -> Iterator[StoreInfo]:
        """A copy of a generated template, as a StoreInfo whose `url` is the copy's; dropped
        afterwards. Nothing may be connected to the template meanwhile (PostgreSQL refuses)."""
        if template.url.startswith("sqlite:///"):
            url = self._new_file()
            for suffix in ("", "-wal"):
                source = Path(sqlite_path(template.url) + suffix)
                if source.exists():
                    shutil.copyfile(source, sqlite_path(url) + suffix)
        else:
            url = self._create_database(template=postgres_parts(template.url)["dbname"])
        try:
            yield replace(template, url=url)
        finally:
            self._drop(url)

    def close(self) -> None:
        """Drop every template made (also after a failure: called from a `finally`)."""
        while self._made:
            self._drop(self._made.pop())

    def _create_database(self, template: str | None = None) -> str:
        name = "bench_t_" + uuid.uuid4().hex[:8]
        clause = f' TEMPLATE "{template}" STRATEGY FILE_COPY' if template else ""
        self._admin(f'CREATE DATABASE "{name}"{clause}')
        base = urlparse(self.postgres_url)._replace(path=f"/{name}", query="")
        return f"{base.geturl()}?schema={SCHEMA}"

    def _new_file(self) -> str:
        return f"sqlite:///{self.workdir / (uuid.uuid4().hex[:8] + '.db')}"

    def _drop(self, url: str) -> None:
        if url.startswith("sqlite:///"):
            for suffix in ("", "-wal", "-shm"):
                Path(sqlite_path(url) + suffix).unlink(missing_ok=True)
        else:
            self._admin(f'DROP DATABASE IF EXISTS "{postgres_parts(url)["dbname"]}" WITH (FORCE)')

    def _admin(self, statement: str) -> None:
        import psycopg

        # CREATE/DROP DATABASE cannot run in a transaction block: autocommit.
        with psycopg.connect(postgres_conninfo(self.postgres_url), autocommit=True) as conn:
            conn.execute(statement)  # type: ignore[arg-type] - names made here, not input
