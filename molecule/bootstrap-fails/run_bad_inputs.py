"""Run the site playbook once per bad input of bad_inputs.yml, three at a time, and print
one JSON list: the input, the expected pattern, the exit code and the whole output of each
run. Used by converge.yml, which asserts on it (the runs never reach the host: preflight
stops them; this script only saves wall time by running them side by side).

Usage: run_bad_inputs.py TABLE INVENTORY LIMIT PLAYBOOK
"""

from __future__ import annotations

import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import yaml


def run(entry: dict[str, Any], inventory: str, limit: str, playbook: str) -> dict[str, Any]:
    argv = ["ansible-playbook", "-i", inventory, "--limit", limit, playbook]
    argv += ["-e", json.dumps(entry["vars"])]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=600, check=False)
    return {**entry, "rc": proc.returncode, "output": proc.stdout + proc.stderr}


def main() -> int:
    table, inventory, limit, playbook = sys.argv[1:5]
    with open(table) as f:
        entries = yaml.safe_load(f)["bad_inputs"]
    with ThreadPoolExecutor(max_workers=3) as pool:
        results = list(pool.map(lambda e: run(e, inventory, limit, playbook), entries))
    json.dump(results, sys.stdout)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
