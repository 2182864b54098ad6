"""Tasks, executed by the receivers: they write files under the app's state directory."""

from __future__ import annotations

import json
import os
import socket
import time
from datetime import UTC, datetime
from typing import Any

from taskiq import Context, TaskiqDepends

from pinboard.broker import broker, settings


@broker.task(task_name="pinboard.save_pin")
async def save_pin(pin_id: str, text: str) -> dict[str, Any]:
    record = {
        "id": pin_id,
        "text": text,
        "pid": os.getpid(),
        "ppid": os.getppid(),
        "host": socket.gethostname(),
    }
    settings.pins_dir.mkdir(parents=True, exist_ok=True)
    path = settings.pins_dir / f"{pin_id}.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record))
    tmp.replace(path)
    return {**record, "path": str(path)}


# One tick per minute, sent by the one scheduler.
@broker.task(
    task_name="pinboard.minute",
    schedule=[{"cron": "* * * * *", "schedule_id": "pinboard-minute"}],
)
async def minute(context: Context = TaskiqDepends()) -> str:
    sent = float(context.message.labels.get("sent_at", time.time()))
    stamp = datetime.fromtimestamp(sent, UTC).strftime("%Y-%m-%dT%H:%M")
    settings.pins_dir.mkdir(parents=True, exist_ok=True)
    with (settings.pins_dir / "ticks.log").open("a") as f:
        f.write(f"{stamp} {os.getpid()}\n")
    return stamp
