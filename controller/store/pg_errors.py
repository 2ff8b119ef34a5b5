"""PostgreSQL failures as the store's errors: what failed, on which database, what to do.

Every message names the database by its DSN with the password taken out (``redact_dsn``),
never the DSN as given. Failures of the server or of the link become ``StoreError`` (the
store's own failure, as SQLite's disk-full or locked database); a value PostgreSQL refuses to
store (a NUL character in a text, a number out of range: SQLSTATE class 22) is an invalid
argument and becomes ``ValueError``, as the interface says of invalid arguments.
"""

from __future__ import annotations

from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import asyncpg

from margo_stream.errors import StoreError

DSN_SCHEMES = ("postgresql", "postgres")

# Transient conflicts between concurrent transactions: the transaction is run again.
RETRYABLE = (asyncpg.SerializationError, asyncpg.DeadlockDetectedError)

# The link to the server is gone (a restarted server, a connection the server terminated
# while it sat in the pool: asyncpg then reports an InternalClientError).
_LINK_LOST = (
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    asyncpg.InternalClientError,
    asyncpg.CannotConnectNowError,
    asyncpg.AdminShutdownError,
    OSError,
    TimeoutError,
)


def is_link_lost(exc: BaseException) -> bool:
    """Whether ``exc`` says the connection failed (not a value the driver refused)."""
    return isinstance(exc, _LINK_LOST) and not isinstance(exc, ValueError)


def redact_dsn(dsn: str) -> str:
    """``postgresql://user:secret@host:5432/db?password=x&sslmode=require`` ->
    ``postgresql://user@host:5432/db?sslmode=require``: safe to log and to show."""
    try:
        parts = urlsplit(dsn)
    except ValueError:
        return "postgresql://(unparsable DSN)"
    host = parts.hostname or ""
    if ":" in host:  # an IPv6 address
        host = f"[{host}]"
    try:
        port = f":{parts.port}" if parts.port is not None else ""
    except ValueError:
        port = ""
    user = f"{parts.username}@" if parts.username else ""
    query = urlencode([(k, v) for k, v in parse_qsl(parts.query) if k.lower() != "password"])
    return urlunsplit((parts.scheme, f"{user}{host}{port}", parts.path, query, ""))


def store_error(name: str, what: str, exc: BaseException) -> StoreError | ValueError:
    """The error to raise for ``exc``, met while doing ``what`` on the database ``name`` (a
    redacted DSN)."""
    text = str(exc).strip() or type(exc).__name__
    where = f"PostgreSQL store {name}"
    if isinstance(exc, asyncpg.DataError | ValueError):  # the server's, or the driver's
        return ValueError(f"{what}: PostgreSQL refused a value ({text})")
    if isinstance(
        exc, asyncpg.InvalidPasswordError | asyncpg.InvalidAuthorizationSpecificationError
    ):
        return StoreError(
            f"{where}: authentication failed ({text}); check the user and password of --store"
        )
    if isinstance(exc, asyncpg.InvalidCatalogNameError):
        return StoreError(f"{where}: the database does not exist ({text}); create it first")
    if isinstance(exc, asyncpg.DiskFullError):
        return StoreError(f"{where}: {what}: disk full ({text}); free space on the server")
    if isinstance(exc, asyncpg.TooManyConnectionsError):
        return StoreError(
            f"{where}: the server has no connection left ({text}); raise max_connections"
            " or run fewer controllers"
        )
    if isinstance(exc, asyncpg.ReadOnlySQLTransactionError):
        return StoreError(f"{where} is read-only ({what}: {text}); point --store at the primary")
    if isinstance(exc, asyncpg.InsufficientPrivilegeError):
        return StoreError(f"{where}: {what}: permission denied ({text})")
    if is_link_lost(exc):
        return StoreError(f"{where}: {what}: connection failed ({text})")
    return StoreError(f"{where}: {what} failed ({text})")


def is_store_failure(exc: BaseException) -> bool:
    """Whether ``exc`` comes from the driver or the link (and must go through
    ``store_error``), rather than from the store's own checks."""
    return isinstance(exc, (asyncpg.PostgresError, *_LINK_LOST))
