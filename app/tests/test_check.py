"""`xagent-check` (deploy readiness) as a subprocess with the units' settings: failures,
and idle receivers counted as alive. The other passing checks run against the whole stack
in test_stack.py."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from conftest import Stack, base_env, check


def _one_line(text: str) -> str:
    lines = text.strip().splitlines()
    assert len(lines) == 1, text
    return lines[0]


def test_checks_fail_with_a_reason_when_nothing_runs(
    session_db: str, queue_name: str, tmp_path: Path
) -> None:
    env = base_env(session_db, queue_name, tmp_path / "models")
    result = check(env, "receivers", "--timeout", "2")
    assert result.returncode == 1
    assert _one_line(result.stderr) == (
        "xagent-check receivers: 0 of 1 consumer(s) of testhost alive in the last "
        "20 s; no receiver answered a ping within 2 s"
    )
    assert result.stdout == ""
    del env["XAGENT_REDIS_URL"]
    result = check(env, "scheduler", "--timeout", "1")
    assert result.returncode == 1
    assert _one_line(result.stderr) == (
        "xagent-check scheduler: XAGENT_REDIS_URL: required setting is missing"
    )


def test_idle_receivers_count_as_alive(
    session_db: str,
    queue_name: str,
    tmp_path: Path,
    stack_factory: Callable[[dict[str, str]], Stack],
) -> None:
    # No scheduler, no traffic: on Redis 7.0 a consumer waiting on an empty stream is not
    # even listed in XINFO CONSUMERS (nor gets younger there); the check must go by the
    # receivers' liveness keys instead.
    env = base_env(session_db, queue_name, tmp_path / "models", XAGENT_HEARTBEAT_SECONDS="1")
    stack = stack_factory(env)
    stack.receiver(2)
    time.sleep(4)
    # --timeout is a deadline (the check returns once it passes) and must leave room for
    # the ping's round trip on a loaded machine; --recent is what this test is about
    result = check(
        env, "receivers", "--host", "testhost", "--min", "2", "--recent", "3", "--timeout", "30"
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("ok: 2 consumer(s) of testhost reading"), result.stdout
