"""Receivers as real `taskiq worker` processes: SIGKILL mid-task (redelivery on a quiet
queue), heartbeats (no reclaim of held entries), SIGTERM (graceful stop, hand-over, the
consumer leaves), a lost stream (group recreated at id 0)."""

from __future__ import annotations

import importlib.util
import json
import re
import signal
import sys
import uuid
from collections.abc import Callable
from pathlib import Path

import httpx
import redis

from conftest import HTTP_TIMEOUT, TEST_REDIS_URL, Stack, base_env, sql, wait_until
from xagent import streams


def _status(db_url: str, run_id: str) -> tuple[str, int]:
    row = sql(db_url, "SELECT status, attempts FROM runs WHERE id = $1", uuid.UUID(run_id))[0]
    return str(row["status"]), int(row["attempts"])


def _start_sleep_run(base_url: str, seconds: float) -> str:
    resp = httpx.post(
        f"{base_url}/runs",
        json={"tool": "sleep", "args": {"seconds": seconds}},
        timeout=HTTP_TIMEOUT,
    )
    assert resp.status_code == 202, resp.text
    run_id: str = resp.json()["id"]
    return run_id


def test_sigkilled_receivers_run_is_redelivered_on_a_quiet_queue(
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
    # long enough to be still running when the test (polling, on a loaded machine) kills it
    run_id = _start_sleep_run(base_url, 5)
    wait_until(lambda: _status(session_db, run_id)[0] == "running", what="run to start")

    doomed.signal_group(signal.SIGKILL)  # main process and its child, no cleanup at all
    doomed.popen.wait(5)
    assert _status(session_db, run_id) == ("running", 1)

    # no scheduler and no other traffic: the new receiver's periodic reclaim finds the entry
    # once it has been idle for XAGENT_STREAM_IDLE_TIMEOUT_MS; the dead run's lease (half of
    # it) has expired by then, so the new execution takes the run over
    replacement = stack.receiver(1)
    wait_until(lambda: _status(session_db, run_id)[0] == "done", timeout=30, what="redelivery")
    assert _status(session_db, run_id) == ("done", 2)
    body = httpx.get(f"{base_url}/runs/{run_id}").json()
    assert body["result"] == {"slept": 5}
    assert "reclaimed 1 stream entries idle > 3000 ms" in replacement.log()


def test_held_entries_are_not_reclaimed_while_running_or_waiting(
    session_db: str,
    queue_name: str,
    tmp_path: Path,
    stack_factory: Callable[[dict[str, str]], Stack],
) -> None:
    """Runs longer than the idle timeout, and runs fetched in a batch that wait for a slot
    longer than it, keep their entries (heartbeat): executed once, never reclaimed."""
    env = base_env(
        session_db,
        queue_name,
        tmp_path / "models",
        XAGENT_STREAM_IDLE_TIMEOUT_MS="3000",
        XAGENT_RECLAIM_INTERVAL_SECONDS="1",
    )
    stack = stack_factory(env)
    base_url = stack.web()
    # queued before any receiver: the first to read fetches both in one batch and runs them
    # one after the other (--max-async-tasks 1); the other one reclaims every second
    run_ids = [_start_sleep_run(base_url, 4) for _ in range(2)]
    first = stack.receiver(1, "--max-async-tasks", "1", wait=False)
    second = stack.receiver(1, "--max-async-tasks", "1", wait=False)
    wait_until(
        lambda: all(_status(session_db, r)[0] == "done" for r in run_ids),
        timeout=60,
        what="both runs",
    )
    assert [_status(session_db, r) for r in run_ids] == [("done", 1)] * 2
    for proc in (first, second):
        assert "reclaimed" not in proc.log(), proc.log()[-3000:]
        assert "lease held by" not in proc.log()


def test_clean_stop_hands_waiting_entries_over_and_leaves_the_group(
    session_db: str,
    queue_name: str,
    tmp_path: Path,
    stack_factory: Callable[[dict[str, str]], Stack],
) -> None:
    # two minutes: an entry left with a stopped consumer would wait that long
    env = base_env(
        session_db, queue_name, tmp_path / "models", XAGENT_STREAM_IDLE_TIMEOUT_MS="120000"
    )
    stack = stack_factory(env)
    base_url = stack.web()
    # long enough that the test sees the first one running and stops the receiver before
    # it has started the others, also when it polls late on a loaded machine
    run_ids = [_start_sleep_run(base_url, 4) for _ in range(3)]
    leaving = stack.receiver(1, "--max-async-tasks", "1")
    wait_until(lambda: _status(session_db, run_ids[0])[0] == "running", what="first run")
    consumers = _consumers(queue_name)
    assert len(consumers) == 1
    assert re.fullmatch(r"testhost-\d+", consumers[0])

    leaving.popen.send_signal(signal.SIGTERM)
    assert leaving.popen.wait(30) == 0, leaving.log()[-3000:]
    moved = int(
        leaving.wait_for_log(r"left group \S+ \((\d+) pending entries handed over").group(1)
    )
    assert moved >= 1  # fetched in its batch, not started
    assert _consumers(queue_name) == [streams.HANDOVER_CONSUMER]
    assert _status(session_db, run_ids[0]) == ("done", 1)  # the running one finished

    # the next receiver's first reclaim pass takes them: no waiting for the idle timeout
    taking = stack.receiver(1)
    wait_until(
        lambda: all(_status(session_db, r)[0] == "done" for r in run_ids),
        timeout=60,
        what="handed-over runs",
    )
    assert f"reclaimed {moved} stream entries" in taking.log()
    assert [_status(session_db, r)[1] for r in run_ids] == [1, 1, 1]


def test_a_run_longer_than_the_drain_is_handed_back_at_once(
    session_db: str,
    queue_name: str,
    tmp_path: Path,
    stack_factory: Callable[[dict[str, str]], Stack],
) -> None:
    """Issue 20 item 8: a run outlasting --wait-tasks-timeout is cancelled when the drain
    ends, queued again with the hand-back recorded, its entry handed over; the next receiver
    starts it at once and the hand-back did not use an attempt (max attempts 1)."""
    # an entry or lease left behind would wait two minutes: the test would time out
    env = base_env(
        session_db,
        queue_name,
        tmp_path / "models",
        XAGENT_STREAM_IDLE_TIMEOUT_MS="120000",
        XAGENT_RUN_LEASE_SECONDS="60",
        XAGENT_RUN_MAX_ATTEMPTS="1",
    )
    stack = stack_factory(env)
    base_url = stack.web()
    run_id = _start_sleep_run(base_url, 600)
    leaving = stack.receiver(1, "--wait-tasks-timeout", "1")
    wait_until(lambda: _status(session_db, run_id)[0] == "running", what="run to start")

    leaving.popen.send_signal(signal.SIGTERM)
    assert leaving.popen.wait(60) == 0, leaving.log()[-3000:]
    log = leaving.log()
    assert "handed back 1 run(s) still executing after the drain" in log, log[-3000:]
    assert "Broker.shutdown cannot be completed" not in log, log[-3000:]
    assert leaving.wait_for_log(r"\((\d+) pending entries handed over").group(1) == "1"
    row = sql(
        session_db,
        "SELECT status, attempts, handbacks, handed_back_at IS NOT NULL AS recorded "
        "FROM runs WHERE id = $1",
        uuid.UUID(run_id),
    )[0]
    assert tuple(row) == ("queued", 1, 1, True)
    shown = httpx.get(f"{base_url}/runs/{run_id}", timeout=HTTP_TIMEOUT).json()
    assert (shown["status"], shown["handbacks"]) == ("queued", 1)
    assert shown["handed_back_at"] is not None

    taking = stack.receiver(1)
    wait_until(lambda: _status(session_db, run_id) == ("running", 2), what="run taken over")
    assert "reclaimed 1 stream entries" in taking.log()


def test_group_lost_with_the_stream_is_recreated_at_zero(
    session_db: str,
    queue_name: str,
    tmp_path: Path,
    stack_factory: Callable[[dict[str, str]], Stack],
) -> None:
    env = base_env(session_db, queue_name, tmp_path / "models")
    stack = stack_factory(env)
    base_url = stack.web()
    receiver = stack.receiver(1)
    client = redis.Redis.from_url(TEST_REDIS_URL)

    # Redis loses the stream while a receiver listens; the web adds a run (a new stream
    # without a group): the receiver recreates the group at id 0 and gets the run
    client.delete(queue_name)
    run_id = _start_sleep_run(base_url, 0)
    wait_until(lambda: _status(session_db, run_id)[0] == "done", timeout=30, what="first run")
    assert "consumer group missing" in receiver.log()

    # lost again while no receiver runs: the next receiver's group starts at 0 as well
    assert receiver.stop(signal.SIGTERM) == 0
    client.delete(queue_name)
    run_id = _start_sleep_run(base_url, 0)
    assert client.xlen(queue_name) == 1
    assert not client.xinfo_groups(queue_name)
    stack.receiver(1)
    wait_until(lambda: _status(session_db, run_id)[0] == "done", timeout=30, what="second run")


def _consumers(queue: str) -> list[str]:
    client = redis.Redis.from_url(TEST_REDIS_URL)
    return sorted(c["name"].decode() for c in client.xinfo_consumers(queue, queue))


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

    receiver.popen.send_signal(signal.SIGTERM)
    # a deadline, not a speed bound: the 3.11 hang never ends; a loaded machine is just slow
    rc = receiver.popen.wait(60)
    log = receiver.log()
    assert rc == 0, log[-3000:]
    assert _status(session_db, run_id) == ("done", 1)
    # the clean path: no broker shutdown cut off by its timeout, no hard kill
    assert "Broker.shutdown cannot be completed" not in log, log[-3000:]
    assert "Hard kill" not in log, log[-3000:]
    # both children exited by themselves (no leftovers to kill)
    assert log.count("Stopped process worker-") == 2, log[-3000:]
    # each child deleted its consumer (nothing left to hand over)
    assert log.count("pending entries handed over") == 2
    assert _consumers(queue_name) == []


def test_unknown_task_is_left_pending_not_dropped(
    session_db: str,
    queue_name: str,
    tmp_path: Path,
    stack_factory: Callable[[dict[str, str]], Stack],
) -> None:
    """A rolling deploy: release B sends a task that the receivers of release A do not have.
    A's receiver neither runs nor acknowledges it: it stays pending and keeps being
    reclaimed (for a receiver that knows it), while known tasks keep running."""
    env = base_env(
        session_db,
        queue_name,
        tmp_path / "models",
        XAGENT_STREAM_IDLE_TIMEOUT_MS="1000",
        XAGENT_RECLAIM_INTERVAL_SECONDS="1",
    )
    stack = stack_factory(env)
    base_url = stack.web()
    receiver = stack.receiver(1)
    client = redis.Redis.from_url(TEST_REDIS_URL)
    message = {
        "task_id": uuid.uuid4().hex,
        "task_name": "xagent.tasks:new_in_release_b",
        "labels": {},
        "labels_types": {},
        "args": [],
        "kwargs": {},
    }
    entry = client.xadd(queue_name, {b"data": json.dumps(message).encode()})
    # seen, reclaimed after the idle timeout and seen again: never acknowledged
    wait_until(
        lambda: receiver.log().count("is unknown to this release") >= 2,
        timeout=30,
        what="the receiver to see the entry twice",
    )
    # the group is named after the queue
    pending = client.xpending_range(queue_name, queue_name, "-", "+", 10)
    assert [p["message_id"] for p in pending] == [entry]
    assert int(pending[0]["times_delivered"]) >= 2
    # known tasks still run
    run_id = _start_sleep_run(base_url, 0.1)
    wait_until(lambda: _status(session_db, run_id)[0] == "done", what="a known run to finish")
