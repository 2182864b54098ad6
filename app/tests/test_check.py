"""`xagent-check` (deploy readiness) as a subprocess with the units' settings: failures.
The passing checks run against the whole stack in test_stack.py."""

from __future__ import annotations

from pathlib import Path

from conftest import base_env, check


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
        "xagent-check receivers: 0 of 1 consumer(s) of testhost read the stream in the last "
        "20 s; no receiver answered a ping within 2 s"
    )
    assert result.stdout == ""
    del env["XAGENT_REDIS_URL"]
    result = check(env, "scheduler", "--timeout", "1")
    assert result.returncode == 1
    assert _one_line(result.stderr) == (
        "xagent-check scheduler: XAGENT_REDIS_URL: required setting is missing"
    )
