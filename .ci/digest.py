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


def digest(text: str) -> list[str]:
    lines = [ANSI.sub("", line) for line in text.splitlines()]
    out: list[str] = []
    # pytest: the summary lines, and the "E " lines of each failure
    out += [line for line in lines if re.match(r"(FAILED|ERROR) \S+", line)]
    out += [line for line in lines if line.startswith("E   ")][:20]
    # Ansible: the task and the message of every failure
    task = ""
    for i, line in enumerate(lines):
        stripped = re.sub(r"^\[[ 0-9.]+\] ", "", line)
        if stripped.startswith("TASK ["):
            task = stripped
        elif re.match(r"(fatal|failed): \[", stripped) and "...ignoring" not in " ".join(
            lines[i : i + 40]
        ):
            out.append(task)
            out += [s[:300] for s in lines[i : i + 12]]
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
