"""Print what failed in the logs of a `make test` run, briefly.

CI keeps only the tail of the output, so `make test` ends with this digest: the failed
pytest tests with their assertion lines, each failed Ansible task with its message, the
bench smoke's findings and the last line of every Python traceback.

    python3 .ci/digest.py LOG...
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

MAX_LINES_PER_LOG = 60
ANSI = re.compile(r"\x1b\[[0-9;]*m")


SCENARIO_START = re.compile(r"=== molecule test -s (\S+)")
# What follows a task's output: the next task, play, handler or the recap.
TASK_END = re.compile(r"(TASK|PLAY|RUNNING HANDLER) \[|PLAY RECAP")


def failed_sections(lines: list[str]) -> list[list[str]]:
    """The parts of a log that belong to failed Molecule scenarios; a log of no
    scenario is one part."""
    starts = [i for i, line in enumerate(lines) if SCENARIO_START.search(line)]
    if not starts:
        return [lines]
    sections = []
    for a, b in zip(starts, [*starts[1:], len(lines)], strict=True):
        name = SCENARIO_START.search(lines[a]).group(1)  # type: ignore[union-attr]
        if any(f"=== {name}: FAILED" in line for line in lines[a:b]):
            sections.append(lines[a:b])
    return sections


def ansible_failures(lines: list[str]) -> list[str]:
    """Each failed task with the first lines of its message, unless the task's own
    output says the failure was ignored; the last first (it ended the play: earlier
    ones were rescued)."""
    groups: list[list[str]] = []
    task = ""
    for i, line in enumerate(lines):
        stripped = re.sub(r"^\[[ 0-9.]+\] ", "", line)
        if stripped.startswith("TASK ["):
            task = stripped
        elif re.match(r"(fatal|failed): \[", stripped):
            after = (j for j in range(i + 1, len(lines)) if TASK_END.match(lines[j]))
            end = next(after, len(lines))
            if any("...ignoring" in s for s in lines[i:end]):
                continue
            groups.append([task] + [s[:300] for s in lines[i : min(end, i + 12)]])
    return [line for group in reversed(groups) for line in group]


def digest(text: str) -> list[str]:
    lines = [ANSI.sub("", line) for line in text.splitlines()]
    out: list[str] = []
    # pytest: the summary lines, and the "E " lines of each failure
    out += [line for line in lines if re.match(r"(FAILED|ERROR) \S+", line)]
    out += [line for line in lines if line.startswith("E   ")][:20]
    # Ansible: the task and the message of every failure that stopped a play, in the
    # scenarios that failed (a passing scenario's expected, rescued failures are noise
    # that once filled the digest before the real one)
    for section in failed_sections(lines):
        out += ansible_failures(section)
    # bench smoke: what validate() found missing, and an exception that stopped a run
    out += [line for line in lines if "SMOKE FAILED" in line]
    for i, line in enumerate(lines):
        if re.match(r"(\[\S+\] )?Traceback \(most recent call last\)", line):
            ends = [s for s in lines[i + 1 : i + 200] if re.match(r"(\[\S+\] )?\w[\w.]*: ", s)]
            out += [s[:300] for s in ends[:1]]
    out += [line for line in lines if re.search(r"=== \S+: FAILED|scenarios: .*failed", line)]
    return out[:MAX_LINES_PER_LOG]


def main(paths: list[str]) -> int:
    for path in paths:
        p = Path(path)
        if not p.exists():
            continue
        found = digest(p.read_text(errors="replace"))
        if found:
            print(f"--- {p.name}: what failed")
            print("\n".join(found))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
