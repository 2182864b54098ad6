"""Run execution in-process against a real PostgreSQL: every trigger ends the run `done` or
`failed` with a reason, infrastructure errors are retried or left for redelivery, leases
fence late finishers, and the sweeper handles stuck and lost runs."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest
import redis.exceptions
import sqlalchemy.exc
from sqlalchemy import text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from conftest import base_env, create_database, drop_database, run_bootstrap
from xagent import runs, tools

POLICY = runs.Policy(
    host="unit",
    lease=5,
    heartbeat=0.05,
    max_attempts=3,
    retries=2,
    backoff=0.01,
    queued_timeout=60,
    stuck=120,
)


@pytest.fixture(scope="module")
def runs_db(services: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A migrated database of this module's own (the sweeper looks at every row)."""
    db_url = create_database()
    env = base_env(db_url, "unused", tmp_path_factory.mktemp("models"))
    result = run_bootstrap(env, "migrate")
    assert result.returncode == 0, result.stderr
    yield db_url
    drop_database(db_url)


@pytest.fixture
async def engine(runs_db: str) -> AsyncIterator[AsyncEngine]:
    eng = create_async_engine(runs_db)
    yield eng
    await eng.dispose()


@pytest.fixture
def register(monkeypatch: pytest.MonkeyPatch) -> Callable[[str, tools.ToolFunc], None]:
    """Add a tool to the registry for one test."""

    def add(name: str, func: tools.ToolFunc) -> None:
        monkeypatch.setitem(
            tools.REGISTRY, name, tools.Tool(name, "test tool", {"type": "object"}, "1", func)
        )

    return add


class Acks:
    """An ack callable that counts calls and can fail the first ``failures`` ones."""

    def __init__(self, failures: int = 0) -> None:
        self.calls = 0
        self.failures = failures

    @property
    def acked(self) -> bool:
        return self.calls > self.failures

    async def __call__(self) -> None:
        self.calls += 1
        if self.calls <= self.failures:
            raise redis.exceptions.ConnectionError("Redis went away")


async def new_run(engine: AsyncEngine, tool: str, args: dict[str, Any] | None = None) -> str:
    run_id = uuid.uuid4()
    async with engine.begin() as conn:
        await conn.execute(
            text("INSERT INTO runs (id, status, input) VALUES (:id, 'queued', CAST(:i AS json))"),
            {"id": run_id, "i": json.dumps({"tool": tool, "args": args or {}})},
        )
    return str(run_id)


async def row(engine: AsyncEngine, run_id: str) -> dict[str, Any]:
    async with engine.connect() as conn:
        found = (
            await conn.execute(
                text("SELECT *, lease_expires_at <= now() AS lease_over FROM runs WHERE id = :id"),
                {"id": uuid.UUID(run_id)},
            )
        ).mappings()
        return dict(found.one())


async def execute(
    engine: AsyncEngine, run_id: str, ack: Acks, policy: runs.Policy = POLICY, **kw: Any
) -> dict[str, Any]:
    return await runs.execute_run(engine, run_id, policy, ack=ack, **kw)


async def sql(engine: AsyncEngine, statement: str, **params: Any) -> None:
    async with engine.begin() as conn:
        await conn.execute(text(statement), params)


async def until(predicate: Callable[[], bool], what: str, timeout: float = 10) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.01)


# -- tool failures ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "error"),
    [
        ({"op": "pow", "a": -8, "b": 0.5}, "pow(-8, 0.5): math domain error"),
        ({"op": "mul", "a": 1e308, "b": 10}, "mul(1e+308, 10) is not a finite number"),
        ({"op": "div", "a": 1, "b": 0}, "division by zero"),
    ],
)
async def test_issue_calculator_runs_fail_with_the_reason(
    engine: AsyncEngine, args: dict[str, Any], error: str
) -> None:
    run_id = await new_run(engine, "calculator", args)
    ack = Acks()
    out = await execute(engine, run_id, ack)
    r = await row(engine, run_id)
    assert (r["status"], r["error"], r["result"]) == ("failed", error, None)
    assert out["status"] == "failed"
    assert r["attempts"] == 1
    assert r["finished_at"] is not None
    assert r["lease_expires_at"] is None
    assert ack.calls == 1


async def test_any_tool_exception_fails_the_run(
    engine: AsyncEngine, register: Callable[[str, tools.ToolFunc], None]
) -> None:
    async def broken(args: dict[str, Any]) -> Any:
        raise KeyError("no such thing")

    register("broken", broken)
    run_id = await new_run(engine, "broken")
    ack = Acks()
    await execute(engine, run_id, ack)
    r = await row(engine, run_id)
    assert (r["status"], r["error"]) == ("failed", "tool raised KeyError: 'no such thing'")
    assert ack.calls == 1


@pytest.mark.parametrize(
    ("result", "problem"),
    [
        ({"value": float("inf")}, "non-finite number inf at $.value"),
        ({"rows": [1.0, {"x": float("nan")}]}, "non-finite number nan at $.rows[1].x"),
        ({"when": object()}, "object at $.when is not JSON"),
        ({1: "one"}, "non-string key 1 at $"),
    ],
)
async def test_results_that_are_not_finite_json_fail_the_run(
    engine: AsyncEngine,
    register: Callable[[str, tools.ToolFunc], None],
    result: Any,
    problem: str,
) -> None:
    async def returns(args: dict[str, Any]) -> Any:
        return result

    register("returns", returns)
    run_id = await new_run(engine, "returns")
    ack = Acks()
    await execute(engine, run_id, ack)
    r = await row(engine, run_id)
    assert r["status"] == "failed"
    assert r["error"] == f"tool returned an invalid result: {problem}"
    assert ack.calls == 1


# -- infrastructure errors -----------------------------------------------------------------


async def test_pool_timeout_is_retried_with_backoff(
    runs_db: str, engine: AsyncEngine, caplog: pytest.LogCaptureFixture
) -> None:
    run_id = await new_run(engine, "echo", {"text": "hi"})
    small = create_async_engine(runs_db, pool_size=1, max_overflow=0, pool_timeout=0.2)
    held = await small.connect()  # the pool's only connection: the claim times out
    retried: list[BaseException] = []

    async def on_retry(what: str, exc: BaseException) -> None:
        retried.append(exc)
        if not held.closed:
            await held.close()

    ack = Acks()
    try:
        out = await execute(small, run_id, ack, on_retry=on_retry)
    finally:
        await small.dispose()
    assert isinstance(retried[0], sqlalchemy.exc.TimeoutError), retried
    assert out["status"] == "done"
    r = await row(engine, run_id)
    assert (r["status"], r["result"], r["attempts"]) == ("done", {"text": "hi"}, 1)
    assert ack.calls == 1
    assert "claim failed (TimeoutError" in caplog.text


async def test_database_down_leaves_the_message_for_redelivery(
    runs_db: str, engine: AsyncEngine
) -> None:
    run_id = await new_run(engine, "echo", {"text": "later"})
    down = create_async_engine(
        make_url(runs_db).set(port=1), connect_args={"timeout": 2}, pool_pre_ping=False
    )
    ack = Acks()
    retried: list[BaseException] = []
    try:
        out = await execute(down, run_id, ack, on_retry=lambda what, exc: retried.append(exc))
    finally:
        await down.dispose()
    assert out["status"] == "retry-later"
    assert len(retried) == POLICY.retries  # then given up in-process
    assert ack.calls == 0  # redelivered after the idle timeout
    r = await row(engine, run_id)
    assert (r["status"], r["attempts"]) == ("queued", 0)
    # the redelivery, with the database back
    assert (await execute(engine, run_id, ack))["status"] == "done"
    assert ack.calls == 1


async def test_database_error_while_storing_the_result_retries_then_redelivery_completes(
    runs_db: str, engine: AsyncEngine, register: Callable[[str, tools.ToolFunc], None]
) -> None:
    small = create_async_engine(runs_db, pool_size=1, max_overflow=0, pool_timeout=0.2)
    grabbed: list[Any] = []

    async def hog(args: dict[str, Any]) -> Any:
        if not grabbed:  # first execution: the pool is empty when the result is stored
            grabbed.append(await small.connect())
        return {"ok": True}

    register("hog", hog)
    run_id = await new_run(engine, "hog")
    ack = Acks()
    try:
        first = await execute(small, run_id, ack)
        assert first["status"] == "retry-later"
        assert ack.calls == 0
        r = await row(engine, run_id)
        assert (r["status"], r["attempts"]) == ("running", 1)
        await grabbed[0].close()
        # redelivered after the stream idle timeout, by then the lease has expired
        await sql(engine, "UPDATE runs SET lease_expires_at = now() WHERE id = :id", id=run_id)
        second = await execute(small, run_id, ack)
    finally:
        await small.dispose()
    assert second["status"] == "done"
    r = await row(engine, run_id)
    assert (r["status"], r["result"], r["attempts"]) == ("done", {"ok": True}, 2)
    assert ack.calls == 1


async def test_attempts_are_bounded(
    engine: AsyncEngine, register: Callable[[str, tools.ToolFunc], None]
) -> None:
    calls: list[Any] = []

    async def never(args: dict[str, Any]) -> Any:
        calls.append(args)
        return {}

    register("never", never)
    run_id = await new_run(engine, "never")
    # three executions that each ended without a result (receiver killed)
    await sql(
        engine,
        "UPDATE runs SET status = 'running', attempts = 3, lease_expires_at = now() WHERE id = :id",
        id=run_id,
    )
    ack = Acks()
    await execute(engine, run_id, ack)
    r = await row(engine, run_id)
    assert r["status"] == "failed"
    assert r["error"].startswith("gave up after 3 attempts")
    assert calls == []
    assert ack.calls == 1


async def test_failing_ack_is_retried(engine: AsyncEngine) -> None:
    run_id = await new_run(engine, "echo", {"text": "x"})
    ack = Acks(failures=2)
    await execute(engine, run_id, ack)
    assert ack.calls == 3
    assert (await row(engine, run_id))["status"] == "done"


# -- leases: no concurrent double execution --------------------------------------------------


@pytest.fixture
def gated(register: Callable[[str, tools.ToolFunc], None]) -> dict[str, Any]:
    """Tool ``gated``: the first call waits for ``gate``, later calls return at once."""
    state: dict[str, Any] = {"gate": asyncio.Event(), "calls": 0, "cancelled": 0}

    async def gated(args: dict[str, Any]) -> Any:
        state["calls"] += 1
        call = state["calls"]
        if call == 1:
            try:
                await state["gate"].wait()
            except asyncio.CancelledError:
                state["cancelled"] += 1
                raise
        return {"call": call}

    register("gated", gated)
    return state


async def test_a_late_finisher_cannot_overwrite_the_result(
    engine: AsyncEngine, gated: dict[str, Any]
) -> None:
    run_id = await new_run(engine, "gated")
    ack_a, ack_b = Acks(), Acks()
    slow_heartbeat = runs.Policy(**{**POLICY.__dict__, "heartbeat": 60})
    a = asyncio.create_task(execute(engine, run_id, ack_a, slow_heartbeat))
    await until(lambda: gated["calls"] == 1, "first execution to start")
    # A's receiver stalls past its lease; B's delivery takes the run over
    await sql(engine, "UPDATE runs SET lease_expires_at = now() WHERE id = :id", id=run_id)
    out_b = await execute(engine, run_id, ack_b)
    gated["gate"].set()
    out_a = await a
    assert out_b["status"] == "done"
    assert out_a == {"status": "lost-lease", "attempt": 1}
    r = await row(engine, run_id)
    assert (r["status"], r["result"], r["attempts"]) == ("done", {"call": 2}, 2)
    assert (ack_a.calls, ack_b.calls) == (0, 1)  # A never acks: its entry may be B's now


async def test_heartbeat_stops_an_execution_that_lost_its_lease(
    engine: AsyncEngine, gated: dict[str, Any]
) -> None:
    run_id = await new_run(engine, "gated")
    ack = Acks()
    a = asyncio.create_task(execute(engine, run_id, ack))
    await until(lambda: gated["calls"] == 1, "execution to start")
    # another execution took it over (new fencing token)
    await sql(engine, "UPDATE runs SET attempts = attempts + 1 WHERE id = :id", id=run_id)
    out = await asyncio.wait_for(a, timeout=10)
    assert out == {"status": "lost-lease", "attempt": 1}
    assert gated["cancelled"] == 1
    assert ack.calls == 0
    assert (await row(engine, run_id))["status"] == "running"  # the new holder's


async def test_a_run_whose_lease_is_held_is_not_executed_again(
    engine: AsyncEngine, gated: dict[str, Any]
) -> None:
    run_id = await new_run(engine, "gated")
    ack_a, ack_b, ack_c = Acks(), Acks(), Acks()
    a = asyncio.create_task(execute(engine, run_id, ack_a))
    await until(lambda: gated["calls"] == 1, "execution to start")
    # a second delivery while the first execution is alive (heartbeating its lease)
    out_b = await execute(engine, run_id, ack_b)
    assert out_b["status"] == "held"
    assert gated["calls"] == 1
    assert ack_b.calls == 0  # its message comes back later
    gated["gate"].set()
    assert (await a)["status"] == "done"
    # that later delivery: the run is finished, the message is acknowledged
    out_c = await execute(engine, run_id, ack_c)
    assert out_c == {"status": "skipped", "reason": "already done"}
    assert (ack_a.calls, ack_c.calls) == (1, 1)
    assert (await row(engine, run_id))["attempts"] == 1


async def test_a_stopping_receiver_hands_its_runs_back(
    engine: AsyncEngine, gated: dict[str, Any]
) -> None:
    """What the broker's shutdown calls once the drain is over: the run still executing is
    queued again at once and the hand-back recorded, without acknowledging its message."""
    run_id = await new_run(engine, "gated")
    ack = Acks()
    a = asyncio.create_task(execute(engine, run_id, ack))
    await until(lambda: gated["calls"] == 1, "execution to start")
    assert await runs.hand_back_all(timeout=5) == 1
    assert a.done()
    with pytest.raises(asyncio.CancelledError):
        await a
    r = await row(engine, run_id)
    assert (r["status"], r["attempts"], r["handbacks"]) == ("queued", 1, 1)
    assert r["lease_expires_at"] is None
    assert r["handed_back_at"] is not None
    assert ack.calls == 0
    assert await runs.hand_back_all(timeout=5) == 0  # nothing left in flight
    # the receiver that takes the handed-over message runs it at once
    assert (await execute(engine, run_id, ack))["status"] == "done"
    r = await row(engine, run_id)
    assert (r["status"], r["attempts"], r["handbacks"]) == ("done", 2, 1)


async def test_hand_backs_do_not_use_up_attempts(
    engine: AsyncEngine, register: Callable[[str, tools.ToolFunc], None]
) -> None:
    """A long run through more receiver restarts than it has attempts: each receiver hands
    it back, and the run still executes after the last one."""
    state = {"calls": 0, "finish": False}

    async def long(args: dict[str, Any]) -> Any:
        state["calls"] += 1
        while not state["finish"]:
            await asyncio.sleep(0.01)
        return {"calls": state["calls"]}

    register("long", long)
    run_id = await new_run(engine, "long")
    ack = Acks()
    restarts = POLICY.max_attempts + 1
    for n in range(1, restarts + 1):
        a = asyncio.create_task(execute(engine, run_id, ack))
        await until(lambda n=n: state["calls"] == n, f"execution {n} to start")  # type: ignore[misc]
        assert await runs.hand_back_all(timeout=5) == 1
        with pytest.raises(asyncio.CancelledError):
            await a
    r = await row(engine, run_id)
    assert (r["status"], r["attempts"], r["handbacks"]) == ("queued", restarts, restarts)
    state["finish"] = True
    out = await execute(engine, run_id, ack)
    assert (out["status"], out["result"]) == ("done", {"calls": restarts + 1})
    assert ack.calls == 1


async def test_redelivery_of_a_finished_run_and_garbage_are_acknowledged(
    engine: AsyncEngine,
) -> None:
    run_id = await new_run(engine, "echo", {"text": "once"})
    ack = Acks()
    await execute(engine, run_id, ack)
    assert (await execute(engine, run_id, ack))["status"] == "skipped"
    assert (await execute(engine, str(uuid.uuid4()), ack))["reason"] == "no such run"
    assert (await execute(engine, "not-a-uuid", ack))["status"] == "skipped"
    assert ack.calls == 4
    assert (await row(engine, run_id))["attempts"] == 1


# -- the sweeper -----------------------------------------------------------------------------


class Enqueued:
    def __init__(self) -> None:
        self.ids: list[str] = []

    async def __call__(self, run_id: str) -> None:
        self.ids.append(run_id)


async def sweep(
    engine: AsyncEngine, age: float | None, requeue: bool = True
) -> tuple[dict[str, list[str]], Enqueued]:
    enqueued = Enqueued()
    out = await runs.sweep(
        engine, POLICY, oldest_unacked_age=age, enqueue=enqueued, requeue=requeue
    )
    return out, enqueued


async def test_sweeper_fails_runs_stuck_past_their_lease(engine: AsyncEngine) -> None:
    stuck, recent = await new_run(engine, "echo"), await new_run(engine, "echo")
    await sql(
        engine,
        "UPDATE runs SET status = 'running', attempts = 1, "
        "lease_expires_at = now() - make_interval(secs => :s) WHERE id = :id",
        s=POLICY.stuck + 5,
        id=stuck,
    )
    # expired, but a redelivery may still come: left alone
    await sql(
        engine,
        "UPDATE runs SET status = 'running', attempts = 1, "
        "lease_expires_at = now() - interval '5 seconds' WHERE id = :id",
        id=recent,
    )
    out, _ = await sweep(engine, None)
    assert stuck in out["failed_stuck"]
    assert recent not in out["failed_stuck"]
    r = await row(engine, stuck)
    assert r["status"] == "failed"
    assert r["error"].startswith("no result: the lease of attempt 1 expired more than 120 s")
    assert (await row(engine, recent))["status"] == "running"


async def test_sweeper_requeues_queued_runs_whose_message_is_gone(engine: AsyncEngine) -> None:
    old, fresh = await new_run(engine, "echo"), await new_run(engine, "echo")
    await sql(
        engine, "UPDATE runs SET created_at = now() - interval '120 seconds' WHERE id = :id", id=old
    )
    # the oldest unacknowledged entry is older than the run: its message may still wait
    out, enqueued = await sweep(engine, 200)
    assert old not in enqueued.ids
    # Redis state unknown: nothing re-enqueued
    out, enqueued = await sweep(engine, None, requeue=False)
    assert old not in enqueued.ids
    # every unacknowledged entry is younger than the run: its message was lost
    out, enqueued = await sweep(engine, 30)
    assert old in enqueued.ids
    assert old in out["requeued"]
    assert fresh not in enqueued.ids
    r = await row(engine, old)
    assert (r["status"], r["requeues"]) == ("queued", 1)
    assert r["requeued_at"] is not None
    # not again before the queued timeout has passed since the re-enqueue
    _, enqueued = await sweep(engine, None)
    assert old not in enqueued.ids


async def test_sweeper_gives_up_after_max_requeues(engine: AsyncEngine) -> None:
    run_id = await new_run(engine, "echo")
    await sql(
        engine,
        "UPDATE runs SET requeues = :n, requeued_at = now() - interval '120 seconds' "
        "WHERE id = :id",
        n=POLICY.max_attempts,
        id=run_id,
    )
    out, enqueued = await sweep(engine, None)
    assert run_id in out["failed_requeues"]
    assert run_id not in enqueued.ids
    r = await row(engine, run_id)
    assert (r["status"], r["error"]) == ("failed", "never picked up, re-enqueued 3 times")


async def test_sweeper_survives_a_failing_enqueue(engine: AsyncEngine) -> None:
    run_id = await new_run(engine, "echo")
    await sql(
        engine, "UPDATE runs SET created_at = now() - interval '120 seconds' WHERE id = :id",
        id=run_id,
    )  # fmt: skip

    async def down(_: str) -> None:
        raise redis.exceptions.ConnectionError("Redis went away")

    out = await runs.sweep(engine, POLICY, oldest_unacked_age=None, enqueue=down)
    assert run_id not in out["requeued"]
    assert (await row(engine, run_id))["requeues"] == 1  # tried again after the timeout
