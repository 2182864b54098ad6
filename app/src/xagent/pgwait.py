"""Wait for PostgreSQL at boot: retry while it is not reachable *yet*, fail at once otherwise.

At boot ``xagent-bootstrap.service`` may start before PostgreSQL accepts connections (or
PostgreSQL runs on another host that is still booting). Refused/timeout/DNS errors and the
server's own "not now" answers are retried with capped exponential backoff until a deadline;
errors that waiting cannot fix (wrong password, missing database, ...) fail immediately.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections.abc import Callable, Iterator

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

# SQLSTATEs that mean "try again later": class 08 (connection exception), 53300
# too_many_connections, 57P01 admin_shutdown, 57P02 crash_shutdown, 57P03 cannot_connect_now
# ("the database system is starting up" / "shutting down" / "in recovery mode").
_RETRY_SQLSTATE_PREFIXES = ("08",)
_RETRY_SQLSTATES = {"53300", "57P01", "57P02", "57P03"}
BACKOFF_FIRST = 1.0
BACKOFF_MAX = 15.0


class DatabaseUnavailable(Exception):
    """PostgreSQL could not be used; ``str(exc)`` is a one-line cause."""


def _chain(exc: BaseException) -> Iterator[BaseException]:
    """The exception, SQLAlchemy's wrapped driver error, and their causes (no cycles)."""
    seen: set[int] = set()
    todo: list[BaseException | None] = [exc]
    while todo:
        item = todo.pop(0)
        if item is None or id(item) in seen:
            continue
        seen.add(id(item))
        yield item
        orig = getattr(item, "orig", None)
        todo.extend(
            [orig if isinstance(orig, BaseException) else None, item.__cause__, item.__context__]
        )


def _sqlstate(exc: BaseException) -> str | None:
    for item in _chain(exc):
        state = getattr(item, "sqlstate", None)
        if isinstance(state, str) and state:
            return state
    return None


def is_retryable(exc: BaseException) -> bool:
    """True when waiting may help: the server is not there yet, starting, stopping or full."""
    # a certificate that does not verify (wrong CA, name not in it) stays so: an OSError
    # subclass that waiting cannot fix
    if any(isinstance(item, ssl.SSLCertVerificationError) for item in _chain(exc)):
        return False
    state = _sqlstate(exc)
    if state is not None:
        return state.startswith(_RETRY_SQLSTATE_PREFIXES) or state in _RETRY_SQLSTATES
    # asyncpg raises socket errors as they are: refused, reset, unreachable, DNS (gaierror),
    # timeouts (TimeoutError is an OSError); a connection closed mid-handshake while the
    # server shuts down is asyncpg's ConnectionDoesNotExistError (sqlstate 08003, above).
    return any(isinstance(item, OSError) for item in _chain(exc))


def describe(exc: BaseException) -> str:
    """``Type: message`` of the most specific error in the chain (the driver's, not the
    SQLAlchemy wrapper with its boilerplate), on one line."""
    best = exc
    for item in _chain(exc):
        module = type(item).__module__
        if module.startswith("asyncpg") or (
            isinstance(item, OSError) and not module.startswith("sqlalchemy")
        ):
            best = item
            break
    lines = str(best).strip().splitlines()
    detail = lines[0] if lines else ""
    if not detail and isinstance(best, TimeoutError):
        detail = "connection attempt timed out"
    return f"{type(best).__name__}: {detail}" if detail else type(best).__name__


async def _probe(engine: AsyncEngine) -> None:
    async with engine.connect() as conn:
        await conn.execute(text("SELECT 1"))


async def wait_for_database(
    engine: AsyncEngine,
    wait_seconds: float,
    *,
    out: Callable[[str], None] = print,
    clock: Callable[[], float] = time.monotonic,
) -> int:
    """Connect until it works or ``wait_seconds`` have passed; returns the attempt count.

    Raises :class:`DatabaseUnavailable` at once on an error that waiting cannot fix, or when
    the deadline has passed (``wait_seconds == 0``: a single attempt).
    """
    started = clock()
    attempt = 0
    while True:
        attempt += 1
        try:
            await _probe(engine)
        except Exception as exc:
            cause = describe(exc)
            if not is_retryable(exc):
                raise DatabaseUnavailable(f"cannot use postgresql: {cause}") from exc
            elapsed = clock() - started
            if elapsed >= wait_seconds:
                raise DatabaseUnavailable(
                    f"postgresql not reachable after {elapsed:.0f} s and {attempt} attempt(s) "
                    f"(deadline XAGENT_BOOTSTRAP_WAIT_SECONDS={wait_seconds:g}); "
                    f"last error: {cause}"
                ) from exc
            out(f"waiting for postgresql: {cause} (attempt {attempt}, {elapsed:.0f} s elapsed)")
            delay = min(BACKOFF_FIRST * 2 ** (attempt - 1), BACKOFF_MAX)
            # the last attempt happens at the deadline, not a whole backoff after it
            await asyncio.sleep(min(delay, wait_seconds - elapsed))
            continue
        if attempt > 1:
            out(f"postgresql reachable after {clock() - started:.0f} s (attempt {attempt})")
        return attempt
