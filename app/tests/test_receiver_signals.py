"""Receivers under signals: SIGKILL mid-task (redelivery) and SIGTERM (graceful stop)."""

from __future__ import annotations

import importlib.util
import signal
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import httpx

from conftest import Stack, base_env, sql, wait_for_receiver, wait_until


def _status(db_url: str, run_id: str) -> tuple[str, int]:
    row = sql(db_url, "SELECT status, attempts FROM runs WHERE id = $1", uuid.UUID(run_id))[0]
    return str(row["status"]), int(row["attempts"])


def _start_sleep_run(base_url: str, seconds: float) -> str:
    resp = httpx.post(f"{base_url}/runs", json={"tool": "sleep", "args": {"seconds": seconds}})
    assert resp.status_code == 202, resp.text
    run_id: str = resp.json()["id"]
    return run_id


def test_sigkilled_receiver_task_is_redelivered(
    session_db: str,
    queue_name: str,
    tmp_path: Path,
    stack_factory: Callable[[dict[str, str]], Stack],
) -> None:
    env = base_env(
        session_db,
        queue_name,
        tmp_path / "models",
        XAGENT_STREAM_IDLE_TIMEOUT_MS="3000",
        XAGENT_RECLAIM_INTERVAL_SECONDS="1",
    )
    stack = stack_factory(env)
    base_url = stack.web()
    doomed = stack.receiver(1)
    # shorter than the idle timeout: longer tasks get a parallel second execution
    run_id = _start_sleep_run(base_url, 1.5)
    wait_until(lambda: _status(session_db, run_id)[0] == "running", what="run to start")

    doomed.signal_group(signal.SIGKILL)  # main process and its child, no cleanup at all
    doomed.popen.wait(5)
    assert _status(session_db, run_id) == ("running", 1)

    # a new receiver plus the scheduler's reclaim keep-alive: the stale pending message is
    # claimed once it has been idle for XAGENT_STREAM_IDLE_TIMEOUT_MS
    replacement = stack.receiver(1, wait=False)
    stack.scheduler()
    wait_for_receiver(replacement, 1)
    wait_until(lambda: _status(session_db, run_id)[0] == "done", timeout=30, what="redelivered run")
    assert _status(session_db, run_id) == ("done", 2)
    body = httpx.get(f"{base_url}/runs/{run_id}").json()
    assert body["result"] == {"slept": 1.5}


def test_sigterm_finishes_in_flight_task_and_exits_quickly(
    session_db: str,
    queue_name: str,
    tmp_path: Path,
    stack_factory: Callable[[dict[str, str]], Stack],
) -> None:
    assert sys.version_info[:2] >= (3, 11)
    # the fix for the Python 3.11 hang: taskiq worker uses uvloop when it is installed
    assert importlib.util.find_spec("uvloop") is not None
    env = base_env(session_db, queue_name, tmp_path / "models")
    stack = stack_factory(env)
    base_url = stack.web()
    receiver = stack.receiver(2)
    run_id = _start_sleep_run(base_url, 2)
    wait_until(lambda: _status(session_db, run_id)[0] == "running", what="run to start")

    t0 = time.monotonic()
    receiver.popen.send_signal(signal.SIGTERM)
    rc = receiver.popen.wait(20)
    elapsed = time.monotonic() - t0
    assert rc == 0, receiver.log()[-3000:]
    assert elapsed < 8, f"receiver took {elapsed:.1f} s to stop"
    assert _status(session_db, run_id) == ("done", 1)
    # both children exited by themselves (no leftovers to kill)
    log = receiver.log()
    assert log.count("Stopped process worker-") == 2, log[-3000:]
