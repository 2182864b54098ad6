"""The whole app as deployed: gunicorn web, two receivers, one scheduler (real CLIs, the
scheduler with the production unit's flags)."""

from __future__ import annotations

import itertools
import json
import re
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis

from conftest import (
    HTTP_TIMEOUT,
    TEST_REDIS_URL,
    Stack,
    base_env,
    check,
    sql,
    wait_for_receiver,
    wait_until,
)

TICK_INTERVAL = 2


@pytest.fixture(scope="module")
def stack(session_db: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    tmp = tmp_path_factory.mktemp("stack")
    queue = f"xt-{uuid.uuid4().hex[:10]}"
    env = base_env(
        session_db,
        queue,
        tmp / "models",
        XAGENT_TICK_CRON="* * * * *",
        XAGENT_TICK_INTERVAL_SECONDS=str(TICK_INTERVAL),
        XAGENT_RECLAIM_INTERVAL_SECONDS="5",
        XAGENT_HEARTBEAT_SECONDS="1",
    )
    sql(session_db, "DELETE FROM ticks")
    st = Stack(env, tmp)
    try:
        st.web(workers=2)
        receivers = [st.receiver(2, wait=False), st.receiver(2, wait=False)]
        # the flags of the production unit (no longer needed: the leader loop ignores it)
        scheduler = st.scheduler("--skip-first-run", wait=False)
        for proc in receivers:
            wait_for_receiver(proc, 2)
        scheduler.wait_for_log(r"Startup completed", timeout=30)
        yield st
    finally:
        st.stop_all()
        client = redis.Redis.from_url(TEST_REDIS_URL)
        keys = list(client.scan_iter(f"{queue}*"))
        if keys:
            client.delete(*keys)


def _wait_run(base_url: str, run_id: str, timeout: float = 20) -> dict[str, object]:
    def finished() -> dict[str, object] | None:
        body: dict[str, object] = httpx.get(
            f"{base_url}/runs/{run_id}", timeout=HTTP_TIMEOUT
        ).json()
        return body if body["status"] in {"done", "failed"} else None

    result: dict[str, object] = wait_until(finished, timeout=timeout, what=f"run {run_id}")
    return result


def test_healthz_reports_host_and_pid(stack: Stack) -> None:
    body = httpx.get(f"{stack.base_url}/healthz").json()
    assert body["status"] == "ok"
    assert body["host"] == "testhost"
    assert isinstance(body["pid"], int)


def test_readyz_ok_without_models(stack: Stack) -> None:
    resp = httpx.get(f"{stack.base_url}/readyz")
    assert resp.status_code == 200, resp.text
    assert resp.json()["ready"] is True


def test_run_round_trip_through_a_receiver(stack: Stack) -> None:
    resp = httpx.post(
        f"{stack.base_url}/runs",
        json={"tool": "calculator", "args": {"op": "mul", "a": 6, "b": 7}},
        timeout=HTTP_TIMEOUT,
    )
    assert resp.status_code == 202, resp.text
    run_id = resp.json()["id"]
    body = _wait_run(stack.base_url, run_id)
    assert body["status"] == "done"
    assert body["result"] == {"value": 42}
    assert body["attempts"] == 1
    # executed by a child of one of the `taskiq worker` processes, not by the web
    receiver_pids = {p.popen.pid for p in stack.procs if p.name == "receiver"}
    stat = Path(f"/proc/{body['worker_pid']}/stat").read_text()
    assert int(stat.rsplit(")", 1)[1].split()[1]) in receiver_pids
    assert body["worker_host"] == "testhost"
    rows = sql(
        stack.env["XAGENT_DATABASE_URL"], "SELECT status FROM runs WHERE id = $1", uuid.UUID(run_id)
    )
    assert [r["status"] for r in rows] == ["done"]


def test_run_with_bad_arguments_fails_cleanly(stack: Stack) -> None:
    resp = httpx.post(
        f"{stack.base_url}/runs", json={"tool": "echo", "args": {"txt": "x"}}, timeout=HTTP_TIMEOUT
    )
    assert resp.status_code == 202
    body = _wait_run(stack.base_url, resp.json()["id"])
    assert body["status"] == "failed"
    assert "missing argument 'text'" in str(body["error"])


@pytest.mark.parametrize(
    ("args", "error"),
    [
        ({"op": "pow", "a": -8, "b": 0.5}, "pow(-8, 0.5): math domain error"),
        ({"op": "mul", "a": 1e308, "b": 10}, "mul(1e+308, 10) is not a finite number"),
    ],
)
def test_runs_that_used_to_stay_running_fail_with_the_reason(
    stack: Stack, args: dict[str, object], error: str
) -> None:
    resp = httpx.post(
        f"{stack.base_url}/runs", json={"tool": "calculator", "args": args}, timeout=HTTP_TIMEOUT
    )
    assert resp.status_code == 202
    body = _wait_run(stack.base_url, resp.json()["id"])
    assert (body["status"], body["error"], body["attempts"]) == ("failed", error, 1)
    assert body["finished_at"] is not None


def test_unknown_tool_and_run_are_rejected(stack: Stack) -> None:
    assert httpx.post(f"{stack.base_url}/runs", json={"tool": "nope"}).status_code == 422
    assert httpx.get(f"{stack.base_url}/runs/{uuid.uuid4()}").status_code == 404


def test_many_runs_spread_over_receivers(stack: Stack) -> None:
    ids = [
        httpx.post(
            f"{stack.base_url}/runs",
            json={"tool": "word_count", "args": {"text": "a b " * i}},
            timeout=HTTP_TIMEOUT,
        ).json()["id"]
        for i in range(1, 21)
    ]
    bodies = [_wait_run(stack.base_url, run_id) for run_id in ids]
    assert [b["result"] for b in bodies] == [{"words": 2 * i, "chars": 4 * i} for i in range(1, 21)]
    assert all(b["attempts"] == 1 for b in bodies)


BURN = """
import asyncio, json
from xagent.broker import broker
from xagent.tasks import burn_cpu

async def main():
    await broker.startup()
    task = await burn_cpu.kiq(300)
    result = await task.wait_result(timeout=30)
    print(json.dumps({"task_id": task.task_id, "value": result.return_value}))
    await broker.shutdown()

asyncio.run(main())
"""


def test_burn_cpu_result_comes_back_and_expires(stack: Stack) -> None:
    out = subprocess.run(
        [sys.executable, "-c", BURN],
        env=stack.env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    body = json.loads(out.strip().splitlines()[-1])
    assert body["value"]["rounds"] > 0
    receiver_pids = {p.pid for p in stack.procs if p.name == "receiver"}
    assert body["value"]["pid"] not in receiver_pids  # ran in a receiver's child process
    key = f"{stack.env['XAGENT_QUEUE_NAME']}:result:{body['task_id']}"
    ttl = redis.Redis.from_url(TEST_REDIS_URL).ttl(key)
    assert 0 < ttl <= 3600


def test_tools_endpoint_lists_registry(stack: Stack) -> None:
    tools = httpx.get(f"{stack.base_url}/tools").json()
    names = [t["name"] for t in tools]
    assert names == sorted(["calculator", "echo", "sleep", "word_count"])
    assert all(t["active"] for t in tools)
    echo = next(t for t in tools if t["name"] == "echo")
    assert echo["schema"]["required"] == ["text"]
    assert echo["version"] == "1"


def _sends(log: str, schedule_id: str) -> int:
    return len(
        re.findall(rf"Sent task xagent\.record_tick with schedule_id {schedule_id} for ", log)
    )


def test_interval_ticks_each_once_none_skipped_with_two_receivers(stack: Stack) -> None:
    db_url = stack.env["XAGENT_DATABASE_URL"]
    scheduler = next(p for p in stack.procs if p.name == "scheduler")
    query = (
        "SELECT scheduled_for, count(*) AS n FROM ticks "
        "WHERE schedule_id = 'xagent-tick-interval' GROUP BY scheduled_for ORDER BY 1"
    )
    wait_until(lambda: len(sql(db_url, query)) >= 4, timeout=30, what="4 interval ticks")

    # compare rows with the scheduler's own count of sends, once both have settled
    def settled() -> bool:
        sends = _sends(scheduler.log(), "xagent-tick-interval")
        total = sum(int(r["n"]) for r in sql(db_url, query))
        return sends == total

    wait_until(settled, timeout=10, interval=0.3, what="tick rows == scheduler sends")
    rows = sql(db_url, query)
    assert all(r["n"] == 1 for r in rows), rows  # four receiver processes, one row each
    gaps = {
        (b - a).total_seconds() for a, b in itertools.pairwise(r["scheduled_for"] for r in rows)
    }
    assert gaps == {TICK_INTERVAL}, gaps  # every tick, none skipped (late ones are caught up)


def test_ticks_endpoint(stack: Stack) -> None:
    ticks = httpx.get(f"{stack.base_url}/ticks", params={"limit": 3}).json()
    assert 1 <= len(ticks) <= 3
    assert {t["host"] for t in ticks} == {"testhost"}
    assert ticks == sorted(ticks, key=lambda t: t["scheduled_for"], reverse=True)


def test_cron_ticks_once_per_minute_at_the_minute(stack: Stack) -> None:
    """The cron schedule (``* * * * *``) under the production flags: the first tick is sent
    at start, then one per minute boundary, each once although four receivers listen."""
    db_url = stack.env["XAGENT_DATABASE_URL"]
    scheduler = next(p for p in stack.procs if p.name == "scheduler")
    query = (
        "SELECT scheduled_for, count(*) AS n, min(recorded_at) AS recorded_at FROM ticks "
        "WHERE schedule_id = 'xagent-tick' GROUP BY scheduled_for ORDER BY 1"
    )
    wait_until(lambda: len(sql(db_url, query)) >= 2, timeout=80, what="a minute boundary tick")
    wait_until(
        lambda: _sends(scheduler.log(), "xagent-tick") == sum(r["n"] for r in sql(db_url, query)),
        timeout=10,
        what="tick rows == scheduler sends",
    )
    rows = sql(db_url, query)
    assert all(r["n"] == 1 for r in rows), rows
    minutes = [r["scheduled_for"] for r in rows]
    assert all((b - a).total_seconds() == 60 for a, b in itertools.pairwise(minutes)), minutes
    # a boundary tick was sent during its own minute (not skipped, not made up a minute late)
    for r in rows[1:]:
        assert 0 <= (r["recorded_at"] - r["scheduled_for"]).total_seconds() < 60, r


def test_queue_endpoint(stack: Stack) -> None:
    body = httpx.get(f"{stack.base_url}/queue").json()
    assert body["stream"] == stack.env["XAGENT_QUEUE_NAME"]
    assert body["group_exists"] is True
    assert isinstance(body["length"], int)
    assert isinstance(body["lag"], int)
    assert isinstance(body["pending"], int)
    receiver_children = [c for c in body["consumers"] if c["host"] == "testhost"]
    assert len(receiver_children) == 4  # two receivers with two children each
    assert all(c["name"] == f"testhost-{c['pid']}" for c in receiver_children)


def test_readiness_checks_pass(stack: Stack) -> None:
    # --recent shorter than the gaps between tasks: idle receivers must count as alive
    # (their idle time in XINFO grows while they block on an empty stream; Redis 7.0).
    # Not shorter than a liveness key can be old: refreshed every 1 s, stamped in whole
    # seconds (up to ~2 s), plus the lag of a loaded machine.
    result = check(stack.env, "receivers", "--host", "testhost", "--min", "4", "--recent", "4")
    assert result.returncode == 0, result.stderr
    line = result.stdout.strip()
    assert line.startswith("ok: 4 consumer(s) of testhost reading (testhost-"), line
    assert "ping answered by testhost-" in line
    # the deadline must leave room for the ping to come back (asserted below)
    result = check(stack.env, "receivers", "--host", "elsewhere", "--timeout", "10")
    assert result.returncode == 1
    assert "0 of 1 consumer(s) of elsewhere" in result.stderr
    assert "ping" not in result.stderr  # some receiver answered
    scheduler = next(p for p in stack.procs if p.name == "scheduler")
    result = check(stack.env, "scheduler")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"ok: scheduler lease held by testhost-{scheduler.pid} ")


def test_scheduler_stops_cleanly_on_sigint_and_releases_the_lease(stack: Stack) -> None:
    scheduler = next(p for p in stack.procs if p.name == "scheduler")
    # a deadline only (a hang ends in SIGABRT, rc != 0); the clean path is asserted below
    rc = scheduler.stop(signal.SIGINT, timeout=30)
    log = scheduler.log()
    assert rc == 0, log[-2000:]
    assert "SIGINT received: stopping the scheduler" in log
    assert "released scheduler lease" in log
    assert "the leader loop did not stop" not in log
    assert "stopping without cleanup" not in log
    result = check(stack.env, "scheduler", "--timeout", "1")
    assert result.returncode == 1
    assert "no scheduler held the lease" in result.stderr
