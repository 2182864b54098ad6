"""The CI digest names the failed task of a failed scenario with its message, even
when scenarios that passed printed expected failures before it."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

_spec = importlib.util.spec_from_file_location("digest", Path(__file__).parents[1] / "digest.py")
assert _spec and _spec.loader
digest = importlib.util.module_from_spec(_spec)
sys.modules["digest"] = digest
_spec.loader.exec_module(digest)

PASSING_WITH_EXPECTED_FAILURES = [
    "=== molecule test -s bootstrap-fails",
    *[
        line
        for n in range(20)
        for line in (
            f"TASK [Bad input {n}] ***",
            f"fatal: [host]: FAILED! => changed=false msg: expected failure {n}",
            "TASK [Rescue it] ***",
            "ok: [host]",
        )
    ],
    "TASK [Ignored one] ***",
    "fatal: [host]: FAILED! => changed=false msg: ignored",
    "...ignoring",
    "=== bootstrap-fails: OK in 300 s",
]
FAILED = [
    "=== molecule test -s second-app",
    "TASK [Rescued step] ***",
    "fatal: [host]: FAILED! => changed=false msg: rescued",
    "TASK [Web processes have both secrets] ***",
    "fatal: [host]: FAILED! => changed=false",
    "  assertion: pb_lines | length == 10",
    "  evaluated_to: false",
    "PLAY RECAP ***",
    "host : ok=3 changed=0 unreachable=0 failed=1",
    "=== second-app: FAILED after 293 s",
]


def test_the_failed_scenarios_last_task_comes_first_with_its_message() -> None:
    out = digest.digest("\n".join(PASSING_WITH_EXPECTED_FAILURES + FAILED))
    assert out[0] == "TASK [Web processes have both secrets] ***"
    assert "  assertion: pb_lines | length == 10" in out[:4]
    assert not any("expected failure" in line or "msg: ignored" in line for line in out)
    assert "=== second-app: FAILED after 293 s" in out


def test_a_log_without_scenarios_reports_every_unignored_failure() -> None:
    out = digest.digest("TASK [x] ***\nfatal: [h]: FAILED! => msg: boom\nPLAY RECAP ***\n")
    assert out == ["TASK [x] ***", "fatal: [h]: FAILED! => msg: boom"]
