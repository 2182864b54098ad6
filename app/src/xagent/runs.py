"""Executing runs so that every accepted run ends ``done`` or ``failed`` with a reason, and two
deliveries of one run never both write a result.

- Claim: ``queued`` (or ``running`` whose lease expired) -> ``running``, ``attempts + 1``, lease
  until now + ``XAGENT_RUN_LEASE_SECONDS``. The new ``attempts`` value is this execution's
  fencing token: the lease heartbeat and the final write only match the row while
  ``attempts`` still equals it. A run whose lease another execution holds is not executed.
- Tool failures (any exception, a result that is not finite JSON) -> ``failed`` with the cause.
- Infrastructure errors (database, pool timeout, Redis) are retried in-process with backoff;
  when that does not help, the message is not acknowledged: it is redelivered after the stream
  idle timeout, which is another attempt; after ``XAGENT_RUN_MAX_ATTEMPTS`` the run fails.
- The message is acknowledged only once the run's outcome is stored (or it already was).
- Hand-back: a receiver that stops (its drain, ``--wait-tasks-timeout``, is over) cancels
  what still runs; each such run goes back to ``queued`` at once, ``handbacks + 1``, and its
  message is handed over for another receiver. Hand-backs do not count as attempts (only
  ``attempts - handbacks`` does): a rolling restart does not use up a long run's attempts.
- The sweeper fails ``running`` runs whose lease expired long ago and re-enqueues ``queued``
  runs whose message can no longer be in the stream.

Nothing here imports the broker: ``xagent.tasks`` wires it to TaskIQ; tests call it directly.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

import redis.exceptions
import sqlalchemy.exc
from sqlalchemy import and_, func, or_, select, update
from sqlalchemy.ext.asyncio import AsyncEngine

from xagent import db
from xagent.settings import Settings
from xagent.tools import ToolError, call_tool

log = logging.getLogger(__name__)
T = TypeVar("T")
Ack = Callable[[], Awaitable[None]]
RetryHook = Callable[[str, BaseException], Awaitable[None] | None]


@dataclass(frozen=True)
class Policy:
    """The settings runs are executed with (explicit, so tests pass their own)."""

    host: str
    lease: float
    heartbeat: float
    max_attempts: int
    retries: int
    backoff: float
    queued_timeout: float
    stuck: float

    @classmethod
    def from_settings(cls, settings: Settings) -> Policy:
        return cls(
            host=settings.host_name,
            lease=settings.run_lease_seconds,
            heartbeat=settings.heartbeat_seconds,
            max_attempts=settings.run_max_attempts,
            retries=settings.run_retries,
            backoff=settings.run_retry_backoff_seconds,
            queued_timeout=settings.run_queued_timeout_seconds,
            stuck=settings.run_stuck_seconds,
        )


class InfraError(Exception):
    """A database/Redis step still failed after the in-process retries."""


def one_line(exc: BaseException) -> str:
    text_ = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text_[0] if text_ else ''}".rstrip(": ")


def is_infrastructure(exc: BaseException) -> bool:
    """Errors of the database, its pool or Redis that may pass; not data errors of our own."""
    if isinstance(
        exc,
        sqlalchemy.exc.DataError
        | sqlalchemy.exc.IntegrityError
        | sqlalchemy.exc.ProgrammingError
        | redis.exceptions.ResponseError,
    ):
        return False
    return isinstance(
        exc,
        sqlalchemy.exc.DBAPIError  # OperationalError, InterfaceError, ...: connection problems
        | sqlalchemy.exc.TimeoutError  # pool exhausted
        | redis.exceptions.RedisError
        | OSError,  # refused/reset connections, TimeoutError
    )


async def retry(
    what: str, step: Callable[[], Awaitable[T]], policy: Policy, on_retry: RetryHook | None = None
) -> T:
    """Run ``step``; infrastructure errors are retried ``policy.retries`` times with doubling
    backoff, then raised as :class:`InfraError`. Other errors are raised at once."""
    delay = policy.backoff
    for attempt in range(policy.retries + 1):
        try:
            return await step()
        except Exception as exc:
            if not is_infrastructure(exc):
                raise
            if attempt == policy.retries:
                raise InfraError(f"{what}: {one_line(exc)}") from exc
            log.warning(
                "%s failed (%s); retry %d/%d in %.1f s",
                what,
                one_line(exc),
                attempt + 1,
                policy.retries,
                delay,
            )
            if on_retry is not None:
                maybe = on_retry(what, exc)
                if maybe is not None:
                    await maybe
            await asyncio.sleep(delay)
            delay = min(delay * 2, 30.0)
    raise AssertionError("unreachable")  # pragma: no cover


def result_problem(value: Any, path: str = "$") -> str | None:
    """Why ``value`` cannot be stored as the run's JSON result (None: it can)."""
    if isinstance(value, float) and not math.isfinite(value):
        return f"non-finite number {value!r} at {path}"
    if value is None or isinstance(value, str | int | float | bool):
        return None
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                return f"non-string key {key!r} at {path}"
            problem = result_problem(item, f"{path}.{key}")
            if problem:
                return problem
        return None
    if isinstance(value, list | tuple):
        for index, item in enumerate(value):
            problem = result_problem(item, f"{path}[{index}]")
            if problem:
                return problem
        return None
    return f"{type(value).__name__} at {path} is not JSON"


def _lease_until(policy: Policy) -> Any:
    return func.now() + timedelta(seconds=policy.lease)


def _lease_expired() -> Any:
    return or_(db.runs.c.lease_expires_at.is_(None), db.runs.c.lease_expires_at < func.now())


@dataclass
class _Claim:
    kind: str  # started | skipped | held | exhausted
    token: int = 0
    spec: Any = None
    detail: str = ""


async def _claim(engine: AsyncEngine, rid: uuid.UUID, policy: Policy) -> _Claim:
    runs = db.runs
    claimable = or_(runs.c.status == "queued", and_(runs.c.status == "running", _lease_expired()))
    used = runs.c.attempts - runs.c.handbacks
    async with engine.begin() as conn:
        row = (
            await conn.execute(
                update(runs)
                .where(runs.c.id == rid, claimable, used < policy.max_attempts)
                .values(
                    status="running",
                    attempts=runs.c.attempts + 1,
                    worker_host=policy.host,
                    worker_pid=os.getpid(),
                    lease_expires_at=_lease_until(policy),
                )
                .returning(runs.c.input, runs.c.attempts)
            )
        ).first()
        if row is not None:
            return _Claim("started", token=int(row.attempts), spec=row.input)
        gave_up = (
            await conn.execute(
                update(runs)
                .where(runs.c.id == rid, claimable, used >= policy.max_attempts)
                .values(
                    status="failed",
                    error=(
                        f"gave up after {policy.max_attempts} attempts: each ended without a "
                        "result (receiver lost or infrastructure errors)"
                    ),
                    finished_at=func.now(),
                    lease_expires_at=None,
                )
                .returning(runs.c.attempts)
            )
        ).first()
        if gave_up is not None:
            return _Claim("exhausted", token=int(gave_up.attempts))
        current = (
            await conn.execute(
                select(runs.c.status, runs.c.attempts, runs.c.worker_host, runs.c.worker_pid).where(
                    runs.c.id == rid
                )
            )
        ).first()
    if current is None:
        return _Claim("skipped", detail="no such run")
    if current.status == "running":
        return _Claim(
            "held",
            token=int(current.attempts),
            detail=f"attempt {current.attempts} on {current.worker_host}/{current.worker_pid}",
        )
    return _Claim("skipped", detail=f"already {current.status}")


async def _extend_lease(engine: AsyncEngine, rid: uuid.UUID, token: int, policy: Policy) -> bool:
    runs = db.runs
    async with engine.begin() as conn:
        result = await conn.execute(
            update(runs)
            .where(runs.c.id == rid, runs.c.attempts == token, runs.c.status == "running")
            .values(lease_expires_at=_lease_until(policy))
        )
    return bool(result.rowcount)


async def _finish(
    engine: AsyncEngine, rid: uuid.UUID, token: int, status: str, result: Any, error: str | None
) -> bool:
    """The fenced final write: only while this execution still holds the run."""
    runs = db.runs
    async with engine.begin() as conn:
        written = await conn.execute(
            update(runs)
            .where(runs.c.id == rid, runs.c.attempts == token, runs.c.status == "running")
            .values(
                status=status,
                result=result,
                error=error,
                finished_at=func.now(),
                lease_expires_at=None,
            )
        )
    return bool(written.rowcount)


async def _hand_back(engine: AsyncEngine, rid: uuid.UUID, token: int) -> None:
    """The receiver stops before this execution finished: the run is queued again at once (no
    lease to wait for) and the hand-back is recorded; its message is handed over by the
    broker's shutdown."""
    runs = db.runs
    try:
        async with asyncio.timeout(2), engine.begin() as conn:
            await conn.execute(
                update(runs)
                .where(runs.c.id == rid, runs.c.attempts == token, runs.c.status == "running")
                .values(
                    status="queued",
                    lease_expires_at=None,
                    handbacks=runs.c.handbacks + 1,
                    handed_back_at=func.now(),
                )
            )
        log.warning("run %s: attempt %d handed back (the receiver is stopping)", rid, token)
    except Exception as exc:
        # the lease then runs out and the run is taken over as another attempt
        log.warning("run %s: could not hand back attempt %d (%s)", rid, token, exc)


# executions in progress in this process, which a stopping receiver hands back
_IN_FLIGHT: set[asyncio.Task[Any]] = set()


async def hand_back_all(timeout: float) -> int:
    """Cancel every execution still in progress (each hands its run back); returns how many.
    The receiver's drain is over when this is called: they could not finish in time."""
    pending = [task for task in _IN_FLIGHT if not task.done()]
    for task in pending:
        task.cancel()
    if pending:
        await asyncio.wait(pending, timeout=timeout)
    return len(pending)


async def _heartbeat(
    engine: AsyncEngine,
    rid: uuid.UUID,
    token: int,
    policy: Policy,
    tool: asyncio.Task[Any],
    lost: asyncio.Event,
) -> None:
    """Extend the lease while the tool runs; stop the tool when another execution took the
    run over (its result would be discarded anyway)."""
    while True:
        await asyncio.sleep(policy.heartbeat)
        try:
            still_ours = await _extend_lease(engine, rid, token, policy)
        except Exception as exc:
            # the lease may lapse; the fenced final write decides
            log.warning("run %s: lease heartbeat failed (%s)", rid, one_line(exc))
            continue
        if not still_ours:
            log.warning("run %s: attempt %d lost its lease; stopping it", rid, token)
            lost.set()
            tool.cancel()
            return


async def _run_tool(spec: Any) -> tuple[str, Any, str | None]:
    """(status, result, error) of the tool call; never raises except CancelledError."""
    try:
        if not isinstance(spec, dict) or not isinstance(spec.get("tool"), str):
            raise ToolError("run input has no tool name")
        result = await call_tool(spec["tool"], spec.get("args") or {})
    except ToolError as exc:
        return "failed", None, str(exc)
    except Exception as exc:
        # a tool's bug is the run's failure, not the receiver's
        log.warning("tool %r raised", spec, exc_info=True)
        return "failed", None, f"tool raised {one_line(exc)}"
    problem = result_problem(result)
    if problem:
        return "failed", None, f"tool returned an invalid result: {problem}"
    return "done", result, None


async def execute_run(
    engine: AsyncEngine,
    run_id: str,
    policy: Policy,
    *,
    ack: Ack,
    on_retry: RetryHook | None = None,
) -> dict[str, Any]:
    """Execute one delivery of run ``run_id``; returns what happened (the task's result)."""
    try:
        rid = uuid.UUID(run_id)
    except (ValueError, TypeError, AttributeError):
        await ack_with_retry(ack, policy, f"run {run_id}", on_retry)
        return {"status": "skipped", "reason": f"not a run id: {run_id!r}"}
    try:
        claim = await retry(
            f"run {rid}: claim", lambda: _claim(engine, rid, policy), policy, on_retry
        )
    except InfraError as exc:
        log.error("%s; leaving the message for redelivery", exc)
        return {"status": "retry-later", "reason": str(exc)}
    if claim.kind == "skipped":
        log.info("run %s: %s; nothing to do", rid, claim.detail)
        await ack_with_retry(ack, policy, f"run {rid}", on_retry)
        return {"status": "skipped", "reason": claim.detail}
    if claim.kind == "held":
        # another live execution owns it: not executed twice at once; this message stays
        # pending and comes back after the idle timeout (then done, or the lease expired)
        log.warning("run %s: lease held by %s; not executing this delivery", rid, claim.detail)
        return {"status": "held", "reason": claim.detail}
    if claim.kind == "exhausted":
        log.error("run %s: failed after %d attempts", rid, policy.max_attempts)
        await ack_with_retry(ack, policy, f"run {rid}", on_retry)
        return {"status": "failed", "reason": "attempts exhausted"}

    token = claim.token
    lost = asyncio.Event()
    tool = asyncio.ensure_future(_run_tool(claim.spec))
    beat = asyncio.ensure_future(_heartbeat(engine, rid, token, policy, tool, lost))
    me = asyncio.current_task()
    if me is not None:
        _IN_FLIGHT.add(me)
    try:
        status, result, error = await tool
    except asyncio.CancelledError:
        if lost.is_set():
            return {"status": "lost-lease", "attempt": token}
        # the receiver is stopping: the run is queued again now, so the receiver that takes
        # the handed-over message runs it at once instead of waiting for the lease to expire
        await _hand_back(engine, rid, token)
        raise
    finally:
        tool.cancel()
        beat.cancel()
        if me is not None:
            _IN_FLIGHT.discard(me)

    try:
        written = await retry(
            f"run {rid}: store result",
            lambda: _finish(engine, rid, token, status, result, error),
            policy,
            on_retry,
        )
    except InfraError as exc:
        log.error("%s; leaving the message for redelivery", exc)
        return {"status": "retry-later", "reason": str(exc), "attempt": token}
    except sqlalchemy.exc.SQLAlchemyError as exc:
        # the database refused this result (not an outage): the run fails with the reason
        status, result, error = "failed", None, f"result could not be stored: {one_line(exc)}"
        written = await retry(
            f"run {rid}: store failure",
            lambda: _finish(engine, rid, token, status, result, error),
            policy,
            on_retry,
        )
    if not written:
        # a later execution took the run over (our lease expired): its result counts; its
        # message may be the one we hold, so no ack from here
        log.warning("run %s: attempt %d finished after losing its lease; discarded", rid, token)
        return {"status": "lost-lease", "attempt": token}
    await ack_with_retry(ack, policy, f"run {rid}", on_retry)
    return {"status": status, "result": result, "error": error, "attempt": token}


async def ack_with_retry(
    ack: Ack, policy: Policy, what: str, on_retry: RetryHook | None = None
) -> None:
    """Acknowledge; a Redis outage is retried, then only logged (the message comes back)."""
    try:
        await retry(f"{what}: ack", ack, policy, on_retry)
    except InfraError as exc:
        # the outcome is stored: a redelivery finds the run finished and acks then
        log.warning("%s", exc)


# -- the sweeper ---------------------------------------------------------------------------


async def sweep(
    engine: AsyncEngine,
    policy: Policy,
    *,
    oldest_unacked_age: float | None,
    enqueue: Callable[[str], Awaitable[None]],
    requeue: bool = True,
    limit: int = 500,
) -> dict[str, list[str]]:
    """Fail ``running`` runs whose lease expired more than ``policy.stuck`` seconds ago; fail
    ``queued`` runs re-enqueued ``max_attempts`` times; re-enqueue ``queued`` runs older than
    ``policy.queued_timeout`` whose message can no longer be in the stream.

    ``oldest_unacked_age``: seconds since the oldest unacknowledged stream entry was added
    (None: there is none). A run (re-)enqueued before that entry has no unacknowledged
    message: it was acknowledged or lost with Redis. A run enqueued later may still be
    waiting in the stream and is left alone.
    """
    runs = db.runs
    since = func.coalesce(runs.c.requeued_at, runs.c.created_at)
    out: dict[str, list[str]] = {"failed_stuck": [], "failed_requeues": [], "requeued": []}
    async with engine.begin() as conn:
        stuck = await conn.execute(
            update(runs)
            .where(
                runs.c.status == "running",
                func.coalesce(runs.c.lease_expires_at, runs.c.created_at)
                < func.now() - timedelta(seconds=policy.stuck),
            )
            .values(
                status="failed",
                error=func.concat(
                    "no result: the lease of attempt ",
                    runs.c.attempts,
                    f" expired more than {policy.stuck:g} s ago and no receiver took the run "
                    "over (receiver lost)",
                ),
                finished_at=func.now(),
                lease_expires_at=None,
            )
            .returning(runs.c.id)
        )
        out["failed_stuck"] = [str(r.id) for r in stuck]
        too_old = since < func.now() - timedelta(seconds=policy.queued_timeout)
        given_up = await conn.execute(
            update(runs)
            .where(runs.c.status == "queued", too_old, runs.c.requeues >= policy.max_attempts)
            .values(
                status="failed",
                error=f"never picked up, re-enqueued {policy.max_attempts} times",
                finished_at=func.now(),
            )
            .returning(runs.c.id)
        )
        out["failed_requeues"] = [str(r.id) for r in given_up]
        conditions = [runs.c.status == "queued", too_old]
        if oldest_unacked_age is not None:
            # 5 s: the web inserts the row just before it sends the message
            conditions.append(since < func.now() - timedelta(seconds=oldest_unacked_age + 5))
        candidates = (
            select(runs.c.id)
            .where(*conditions)
            .order_by(runs.c.created_at)
            .limit(limit)
            .with_for_update(skip_locked=True)
            .scalar_subquery()
        )
        to_send: list[str] = []
        if requeue:
            marked = await conn.execute(
                update(runs)
                .where(runs.c.id.in_(candidates))
                .values(requeued_at=func.now(), requeues=runs.c.requeues + 1)
                .returning(runs.c.id)
            )
            to_send = [str(r.id) for r in marked]
    for run_id in to_send:
        try:
            await enqueue(run_id)
        except Exception as exc:
            # marked: tried again after the queued timeout
            log.warning("run %s: re-enqueue failed (%s)", run_id, one_line(exc))
            continue
        out["requeued"].append(run_id)
    for key, ids in out.items():
        if ids:
            log.warning("sweeper: %s %d run(s): %s", key, len(ids), ", ".join(ids[:20]))
    return out
