"""`taskiq scheduler xagent.scheduler:scheduler xagent.tasks` as real processes: one sender
under a lease while several run, failover after SIGKILL, a clean swap, catch-up of missed
cron ticks after a restart, Redis outages, stopping on SIGINT/SIGTERM."""

from __future__ import annotations

import itertools
import re
import signal
import sys
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import redis

from conftest import (
    TEST_REDIS_URL,
    Proc,
    RedisServer,
    Stack,
    base_env,
    sql,
    wait_until,
)

LEASE = 3
ACQUIRED = r"scheduler lease acquired by \S+ \(token (\d+)\)"


def _env(db_url: str, queue: str, tmp: Path, **extra: str) -> dict[str, str]:
    return base_env(
        db_url,
        queue,
        tmp / "models",
        # ticks of this test only: tick rows carry the receiver's host name
        XAGENT_HOST_NAME=f"h{queue}",
        XAGENT_SCHEDULER_LEASE_SECONDS=str(LEASE),
        **extra,
    )


def _rows(db_url: str, host: str, schedule_id: str) -> list[tuple[datetime, int]]:
    rows = sql(
        db_url,
        "SELECT scheduled_for, count(*) AS n FROM ticks WHERE host = $1 AND schedule_id = $2 "
        "GROUP BY scheduled_for ORDER BY 1",
        host,
        schedule_id,
    )
    return [(r["scheduled_for"], int(r["n"])) for r in rows]


def _sent(proc: Proc, schedule_id: str) -> list[datetime]:
    found = re.findall(
        rf"Sent task xagent\.record_tick with schedule_id {schedule_id} for (\S+?)[ ,]",
        proc.log(),
    )
    return [datetime.fromisoformat(t) for t in found]


def _assert_each_tick_once(rows: list[tuple[datetime, int]], step: timedelta) -> None:
    assert rows, "no ticks"
    assert all(n == 1 for _, n in rows), [r for r in rows if r[1] != 1]
    gaps = [(b - a) for (a, _), (b, _) in itertools.pairwise(rows)]
    assert all(gap == step for gap in gaps), [(rows[i][0], g) for i, g in enumerate(gaps)]


def test_one_sender_failover_after_sigkill_and_clean_swap(
    session_db: str,
    queue_name: str,
    tmp_path: Path,
    stack_factory: Callable[[dict[str, str]], Stack],
) -> None:
    env = _env(session_db, queue_name, tmp_path, XAGENT_TICK_INTERVAL_SECONDS="1")
    host = env["XAGENT_HOST_NAME"]
    stack = stack_factory(env)
    stack.receiver(1, wait=False)
    first, second = stack.scheduler(wait=False), stack.scheduler(wait=False)

    def leader() -> Proc | None:
        return next((p for p in (first, second) if re.search(ACQUIRED, p.log())), None)

    active = wait_until(leader, timeout=40, what="a scheduler to take the lease")
    standby = second if active is first else first
    standby.wait_for_log(r"standby: scheduler lease held by", timeout=40)
    wait_until(lambda: len(_rows(session_db, host, "xagent-tick-interval")) >= 3, timeout=40)
    assert _sent(standby, "xagent-tick-interval") == []  # two running, one sends

    # the active one dies without releasing: the standby takes over when the lease expires
    active.signal_group(signal.SIGKILL)
    active.popen.wait(10)
    standby.wait_for_log(ACQUIRED, timeout=LEASE + 30)
    wait_until(lambda: len(_sent(standby, "xagent-tick-interval")) >= 3, timeout=30)

    # a clean swap: a new standby, the active one stops and releases, the new one leads
    third = stack.scheduler(wait=False)
    third.wait_for_log(r"standby: scheduler lease held by", timeout=40)
    assert standby.stop(signal.SIGINT, timeout=30) == 0, standby.log()[-3000:]
    assert "released scheduler lease" in standby.log()
    holder = redis.Redis.from_url(TEST_REDIS_URL).hget(f"{queue_name}:scheduler:lease", "holder")
    assert holder in (None, f"{host}-{third.pid}".encode())  # released, not left to expire
    third.wait_for_log(ACQUIRED, timeout=30)
    wait_until(lambda: len(_sent(third, "xagent-tick-interval")) >= 2, timeout=30)
    assert third.stop(signal.SIGINT, timeout=30) == 0

    tokens = [int(p.wait_for_log(ACQUIRED).group(1)) for p in (active, standby, third)]
    assert tokens == sorted(set(tokens))  # every acquisition has a larger fencing token
    logged = [t for p in (active, standby, third) for t in _sent(p, "xagent-tick-interval")]
    # every sent tick recorded, not just the last one: the receiver runs ticks concurrently,
    # so a late tick's row can come after a later tick's
    wait_until(
        lambda: set(logged) <= {t for t, _ in _rows(session_db, host, "xagent-tick-interval")},
        timeout=30,
        what="a row for every tick sent",
    )
    rows = _rows(session_db, host, "xagent-tick-interval")
    # no tick lost (the ones due while nobody led were sent late), none twice
    _assert_each_tick_once(rows, timedelta(seconds=1))
    assert len(logged) == len(set(logged))


def test_restart_catches_up_missed_cron_ticks_once(
    session_db: str,
    queue_name: str,
    tmp_path: Path,
    stack_factory: Callable[[dict[str, str]], Stack],
) -> None:
    """Production flags (--skip-first-run) and a cron schedule: the ticks a stopped
    scheduler missed are sent by the next one, each once, with its own minute."""
    env = _env(session_db, queue_name, tmp_path, XAGENT_TICK_CRON="* * * * *")
    host = env["XAGENT_HOST_NAME"]
    stack = stack_factory(env)
    stack.receiver(1, wait=False)
    old = stack.scheduler("--skip-first-run")
    old.wait_for_log(r"schedule_id xagent-tick for ", timeout=40)
    assert old.stop(signal.SIGINT, timeout=30) == 0
    sent_by_old = _sent(old, "xagent-tick")  # two ticks if it ran across a minute boundary
    last = max(sent_by_old)
    # as if it had stopped three minutes ago: it last sent `last - 3 min`
    client = redis.Redis.from_url(TEST_REDIS_URL)
    client.hset(f"{queue_name}:scheduler:last", "xagent-tick", int(last.timestamp()) - 180)
    # every row of the old one, before they are deleted (a late one would count twice)
    wait_until(
        lambda: set(sent_by_old) <= {t for t, _ in _rows(session_db, host, "xagent-tick")},
        timeout=30,
        what="the old scheduler's rows",
    )
    sql(session_db, "DELETE FROM ticks WHERE host = $1", host)

    new = stack.scheduler("--skip-first-run")

    def caught_up() -> bool:
        # at least the 3 missed minutes, and a row for each tick it logged (the catch-up
        # sends several at once; their rows may arrive in any order)
        sent = set(_sent(new, "xagent-tick"))
        return len(sent) >= 3 and {t for t, _ in _rows(session_db, host, "xagent-tick")} == sent

    wait_until(caught_up, timeout=40, what="catch-up")
    assert re.search(r"schedule_id xagent-tick for \S+, \d+ s late", new.log())
    rows = _rows(session_db, host, "xagent-tick")
    assert rows[0][0] == last - timedelta(minutes=2)
    assert rows[0][0].second == 0
    _assert_each_tick_once(rows, timedelta(minutes=1))


def test_scheduler_waits_for_redis_and_survives_its_restart(
    session_db: str,
    queue_name: str,
    tmp_path: Path,
    stack_factory: Callable[[dict[str, str]], Stack],
    redis_server: RedisServer,
) -> None:
    env = _env(
        session_db,
        queue_name,
        tmp_path,
        XAGENT_REDIS_URL=redis_server.url,
        XAGENT_REDIS_RETRY_MAX_SECONDS="1",
        XAGENT_TICK_INTERVAL_SECONDS="1",
    )
    stack = stack_factory(env)
    scheduler = stack.scheduler(wait=False)
    # Redis down at start: no exit (the unit would give up after a few restarts)
    scheduler.wait_for_log(r"Redis unreachable \(attempt 3: .*\); retrying in 1\.0 s", 40)
    assert scheduler.popen.poll() is None
    redis_server.start()
    scheduler.wait_for_log(r"Startup completed", timeout=30)
    scheduler.wait_for_log(ACQUIRED, timeout=30)
    # Redis goes away and comes back (empty): the scheduler retries and leads again
    redis_server.stop()
    scheduler.wait_for_log(r"scheduler: Redis error \(.*\); retrying in", timeout=30)
    redis_server.start()
    scheduler.wait_for_log(r"Redis reachable again", timeout=30)
    wait_until(lambda: len(re.findall(ACQUIRED, scheduler.log())) >= 2, timeout=30)
    assert scheduler.stop(signal.SIGINT, timeout=30) == 0, scheduler.log()[-3000:]


def test_stop_while_waiting_for_redis(
    session_db: str,
    queue_name: str,
    tmp_path: Path,
    stack_factory: Callable[[dict[str, str]], Stack],
) -> None:
    env = _env(session_db, queue_name, tmp_path, XAGENT_REDIS_URL="redis://127.0.0.1:9/0")
    scheduler = stack_factory(env).scheduler(wait=False)
    scheduler.wait_for_log(r"Redis unreachable \(attempt 1", timeout=40)
    assert scheduler.stop(signal.SIGINT, timeout=30) == 0, scheduler.log()[-3000:]
    assert "stopped before Redis was reachable" in scheduler.log()


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_scheduler_stops_on_signal_even_when_started_with_sigint_ignored(
    session_db: str,
    queue_name: str,
    tmp_path: Path,
    stack_factory: Callable[[dict[str, str]], Stack],
    sig: signal.Signals,
) -> None:
    """The flaky SIGINT stop: a process started as a background job of a non-interactive shell
    (`cmd &`) inherits SIGINT ignored; asyncio then installs no SIGINT handler and the stop
    hung until SIGKILL. The scheduler installs its own handlers."""
    env = _env(session_db, queue_name, tmp_path, XAGENT_TICK_INTERVAL_SECONDS="1")
    scheduler = stack_factory(env).scheduler(
        wait=False, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN)
    )
    scheduler.wait_for_log(r"Sent task xagent\.record_tick", timeout=40)
    rc = scheduler.stop(sig, timeout=30)
    log = scheduler.log()
    assert rc == 0, log[-3000:]
    assert f"{sig.name} received: stopping the scheduler" in log
    assert "Shutting down scheduler." in log
    assert "released scheduler lease" in log
    assert not redis.Redis.from_url(TEST_REDIS_URL).exists(f"{queue_name}:scheduler:lease")


SKEWED_SCHEDULER = """
import sys, time
real = time.time
time.time = lambda: real() + 7200  # this host's clock is two hours ahead
from taskiq.__main__ import main
sys.argv = ["taskiq", "scheduler", "xagent.scheduler:scheduler", "xagent.tasks", "--skip-first-run"]
main()
"""


def test_ticks_follow_the_redis_clock_not_the_hosts(
    session_db: str,
    queue_name: str,
    tmp_path: Path,
    stack_factory: Callable[[dict[str, str]], Stack],
) -> None:
    """A scheduler on a host whose clock is wrong stamps and times its ticks by Redis's
    clock (TIME), the one clock every host's scheduler shares."""
    env = _env(session_db, queue_name, tmp_path, XAGENT_TICK_CRON="* * * * *")
    stack = stack_factory(env)
    proc = stack.start("scheduler", [sys.executable, "-c", SKEWED_SCHEDULER], None, None)
    proc.wait_for_log(r"schedule_id xagent-tick for ", timeout=40)
    redis_now = datetime.fromtimestamp(float(redis.Redis.from_url(TEST_REDIS_URL).time()[0]), UTC)
    (tick, *_) = _sent(proc, "xagent-tick")
    assert abs(tick - redis_now) < timedelta(minutes=2), (tick, redis_now)
