"""Database URLs: `sqlite:///path` (`:memory:` allowed) or
`postgresql://user[:password]@host[:port]/db[?schema=name]`."""

from __future__ import annotations

from urllib.parse import parse_qs, unquote, urlparse


def is_postgres(url: str) -> bool:
    """Whether `url` names a PostgreSQL database."""
    return url.startswith(("postgresql://", "postgres://"))


def postgres_parts(url: str) -> dict[str, str]:
    """host, port, dbname, user, password, schema of a postgresql:// URL."""
    parsed = urlparse(url)
    schema = parse_qs(parsed.query).get("schema", ["public"])[0]
    return {"host": parsed.hostname or "127.0.0.1", "port": str(parsed.port or 5432),
            "dbname": unquote(parsed.path.lstrip("/")) or "postgres",
            "user": unquote(parsed.username or "postgres"),
            "password": unquote(parsed.password or ""), "schema": schema}


def postgres_conninfo(url: str) -> str:
    """A libpq connection string for psycopg (schema excluded)."""
    p = postgres_parts(url)
    return (f"host={p['host']} port={p['port']} dbname={p['dbname']} user={p['user']}"
            + (f" password={p['password']}" if p["password"] else ""))


def sqlite_path(url: str) -> str:
    """The file path of a sqlite:///path URL (`:memory:` allowed); raises ValueError otherwise."""
    if not url.startswith("sqlite:///"):
        raise ValueError(f"unsupported database URL {url!r}: use sqlite:///path or postgresql://")
    return url[len("sqlite:///"):]


def redacted_url(url: str) -> str:
    """`url` with any password replaced by `***`, for logs and start-up messages."""
    parsed = urlparse(url)
    if not parsed.password:
        return url
    netloc = parsed.netloc.replace(f":{parsed.password}@", ":***@", 1)
    return parsed._replace(netloc=netloc).geturl()
