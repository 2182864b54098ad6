"""``pinboard-init``: the one-time work, run once per release before anything serves.

Writes the board catalog into the state directory (the web's readiness needs it), checks
that Redis accepts the password from the environment, and appends one line per run to
``init-runs.log`` (so a test can count the runs)."""

from __future__ import annotations

import json
import os
import sys
from datetime import UTC, datetime

import redis

from pinboard.settings import load

CATALOG = {"boards": ["inbox", "ideas", "done"], "version": 1}


def main() -> int:
    settings = load()
    try:
        redis.Redis.from_url(settings.redis_url, socket_connect_timeout=5).ping()
    except redis.RedisError as exc:
        print(f"pinboard-init: error: redis: {exc}", file=sys.stderr)
        return 1
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    catalog = settings.data_dir / "catalog.json"
    if not catalog.exists() or json.loads(catalog.read_text()) != CATALOG:
        catalog.write_text(json.dumps(CATALOG))
    now = datetime.now(UTC).isoformat(timespec="seconds")
    with (settings.data_dir / "init-runs.log").open("a") as f:
        f.write(f"{now} pid={os.getpid()}\n")
    print(f"pinboard-init done: catalog {catalog}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
