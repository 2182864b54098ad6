"""Cancellation that survives redis-py on Python 3.11.

redis-py 8 gives every connection a 5 s socket timeout by default and then sends each
command through ``asyncio.wait_for``. On Python 3.11, ``wait_for`` returns the inner result
and drops the caller's cancellation when the cancellation arrives just as the send
completes (fixed in 3.12). Measured here: a task looping over Redis commands ignored about
one ``cancel()`` in three. A loop that relies on being cancelled then runs on: a scheduler
that never stops, a receiver child whose stop hangs.

The task still records the request (``Task.cancelling()``), so long-running loops check it
(:func:`raise_if_cancel_lost`) and callers cancel until the task is really done
(:func:`cancel_and_wait`).
"""

from __future__ import annotations

import asyncio
from typing import Any


def raise_if_cancel_lost() -> None:
    """Raise CancelledError when this task was asked to stop but the request got lost.

    Only for tasks that never suppress a cancellation on purpose (loops run as their own
    task), since ``cancelling()`` stays above 0 once a cancellation was caught and dropped.
    """
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


async def cancel_and_wait(task: asyncio.Task[Any], timeout: float) -> bool:
    """Cancel ``task`` again and again until it is done (or ``timeout``); True when done."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not task.done() and loop.time() < deadline:
        task.cancel()
        await asyncio.wait({task}, timeout=0.2)  # raises only if we are cancelled ourselves
    return task.done()
