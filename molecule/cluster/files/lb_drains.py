"""What HAProxy's journal says about each backend server's drains since a time.

Per server of the backend: how many times it entered drain state and came back
up, and how many requests HAProxy started sending it while it was drained
(their request date, %tr of the httplog format, after the drain line was
logged and before the server was up again). Requests already under way when
the drain began finish there and are not counted. Prints one JSON object.

Usage: lb_drains.py --since 'YYYY-MM-DD HH:MM:SS' --backend web SERVER...
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
from datetime import datetime

# "... [03/Dec/2026:08:10:11.123] http web/xagent-cluster-web1 0/0/0/1/1 200 ..."
REQUEST = re.compile(r"\[(\d{2}/\w{3}/\d{4}:\d{2}:\d{2}:\d{2}\.\d{3})\] \S+ (\S+)/(\S+) ")
# The request date is in local time with millisecond precision. A state line's
# time is when HAProxy sent it to /dev/log (_SOURCE_REALTIME_TIMESTAMP, the
# kernel's timestamp of the datagram), not when journald got round to it
# (__REALTIME_TIMESTAMP): on a loaded host that was tens of milliseconds
# later, and a request sent right after "is UP" counted as sent while drained.
SLACK_S = 0.002


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--since", required=True)
    parser.add_argument("--backend", required=True)
    parser.add_argument("servers", nargs="+")
    args = parser.parse_args()
    out = subprocess.run(
        ["journalctl", "--no-pager", "-o", "json", "-u", "haproxy.service", "--since", args.since],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    windows: dict[str, list[list[float]]] = {s: [] for s in args.servers}
    ups: dict[str, int] = dict.fromkeys(args.servers, 0)
    requests: list[tuple[float, str]] = []
    for line in out.splitlines():
        entry = json.loads(line)
        message = entry.get("MESSAGE")
        if not isinstance(message, str):
            continue
        # HAProxy also prints state changes on stderr ("[WARNING] (pid) : ..."),
        # a second journal line per event: count the syslog one only.
        if message.startswith("["):
            continue
        logged = int(entry.get("_SOURCE_REALTIME_TIMESTAMP") or entry["__REALTIME_TIMESTAMP"]) / 1e6
        for server in args.servers:
            name = f"Server {args.backend}/{server} "
            drained = bool(windows[server]) and windows[server][-1][1] == float("inf")
            if name + "enters drain state" in message and not drained:
                windows[server].append([logged, float("inf")])
            elif name + "is UP (leaving forced drain)" in message:
                ups[server] += 1
                if drained:
                    windows[server][-1][1] = logged
        match = REQUEST.search(message)
        if match and match.group(2) == args.backend:
            at = datetime.strptime(match.group(1), "%d/%b/%Y:%H:%M:%S.%f").timestamp()
            requests.append((at, match.group(3)))
    result = {}
    for server in args.servers:
        sent_while_drained = [
            at
            for at, to in requests
            if to == server and any(start + SLACK_S < at < end for start, end in windows[server])
        ]
        result[server] = {
            "drains": len(windows[server]),
            "ups": ups[server],
            "drained_seconds": round(sum(end - start for start, end in windows[server]), 3),
            "requests": sum(1 for _, to in requests if to == server),
            "requests_while_drained": len(sent_while_drained),
        }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
