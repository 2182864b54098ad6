"""Loops stop although a Redis call drops their cancellation.

On Python 3.11, redis-py sends every command through ``asyncio.wait_for`` (its default socket
timeout is 5 s), which returns normally when the caller's cancellation arrives just as the
send completes. This happened in a test run: a scheduler's leader loop kept sending ticks
after "Shutting down scheduler." until SIGKILL. Here the Redis calls of the receivers' listen
loop and of the scheduler's leader loop are replaced by one that drops a cancellation the
same way, deterministically.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from conftest import base_env

SCRIPT = """
import asyncio, json

from xagent import aio
from xagent.broker import broker
from xagent.scheduler import scheduler


async def drops_cancellation(*args, **kwargs):
    try:
        await asyncio.sleep(0.05)
    except asyncio.CancelledError:
        pass  # what asyncio.wait_for does on 3.11 when the send completes meanwhile
    return []


async def stops(task, seconds=5.0):
    task.cancel()  # once, as the receiver and asyncio do
    done, _ = await asyncio.wait({task}, timeout=seconds)
    return bool(done)


async def main():
    out = {}
    broker._read = drops_cancellation
    broker._reclaim = drops_cancellation
    listening = asyncio.create_task(anext(broker.listen()))
    await asyncio.sleep(0.3)
    out["listen_stopped"] = await stops(listening)
    await broker.shutdown()

    scheduler._step = drops_cancellation
    scheduler._leader_task = asyncio.create_task(scheduler._lead())
    await asyncio.sleep(0.3)
    try:
        async with asyncio.timeout(10):
            await scheduler.shutdown()
        out["leader_stopped"] = scheduler._leader_task.done()
    except TimeoutError:
        out["leader_stopped"] = False
    print(json.dumps(out))


asyncio.run(main())
"""


def test_loops_stop_when_redis_drops_their_cancellation(
    session_db: str, queue_name: str, tmp_path: Path
) -> None:
    env = base_env(session_db, queue_name, tmp_path / "models")
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out == {"listen_stopped": True, "leader_stopped": True}, result.stderr[-3000:]
