"""``xagent-dev``: the production layers on a developer's machine, without systemd.

A local ``uvicorn xagent.main:app`` skips the one-time work (it lives in bootstrap, not in
the web's lifespan) and runs no receiver or scheduler. This command runs what a server runs,
in the same order and as separate processes:

1. the one-time work (``xagent-bootstrap all``), once; nothing else starts if it fails;
2. the web (uvicorn with code reload), one scheduler and ``--receivers`` receivers.

Every line of their output is prefixed with the process's name. Ctrl-C (or SIGTERM) stops
them all as systemd would: SIGINT to each process group (the scheduler and the receivers
drain on it), SIGKILL for what is left after ``--stop-timeout``. A process that exits on its
own stops the others too: half a stack hides errors. Settings come from the environment as
on a server (``XAGENT_*``; secrets as ``XAGENT_DATABASE_PASSWORD``, ... or from
``$CREDENTIALS_DIRECTORY``), against a local Redis and PostgreSQL.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import os
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from types import FrameType
from typing import IO

_print_lock = threading.Lock()


def _say(name: str, line: str) -> None:
    with _print_lock:
        sys.stdout.write(f"{name:<12}| {line.rstrip()}\n")
        sys.stdout.flush()


def _program(name: str) -> str:
    """A console script of this environment (the venv's bin first), else from PATH."""
    beside = Path(sys.executable).parent / name
    if beside.exists():
        return str(beside)
    return shutil.which(name) or name


def _pump(name: str, stream: IO[bytes]) -> None:
    for raw in iter(stream.readline, b""):
        _say(name, raw.decode(errors="replace"))
    stream.close()


class Child:
    """One process in a session of its own, its output prefixed with ``name``."""

    def __init__(self, name: str, argv: list[str]) -> None:
        self.name = name
        self.popen = subprocess.Popen(
            argv,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        assert self.popen.stdout is not None
        self.pump = threading.Thread(target=_pump, args=(name, self.popen.stdout), daemon=True)
        self.pump.start()
        _say("dev", f"started {name} (pid {self.popen.pid}): {shlex.join(argv)}")

    def signal(self, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.popen.pid, sig)

    def finish(self) -> int:
        """Reap it; its group's strays too (a reloader's worker)."""
        rc = self.popen.wait()
        self.signal(signal.SIGKILL)
        self.pump.join(timeout=2)
        return rc


def _reload_dir(web_app: str) -> str | None:
    spec = importlib.util.find_spec(web_app.split(":", 1)[0].split(".", 1)[0])
    if spec is None or not spec.submodule_search_locations:
        return None
    return str(next(iter(spec.submodule_search_locations)))


def build_commands(args: argparse.Namespace) -> list[tuple[str, list[str]]]:
    web = [
        sys.executable,
        "-m",
        "uvicorn",
        args.web_app,
        "--host",
        args.host,
        "--port",
        str(args.port),
    ]
    if args.reload:
        web.append("--reload")
        src = _reload_dir(args.web_app)
        if src:
            web += ["--reload-dir", src]
    taskiq = [sys.executable, "-m", "taskiq"]
    commands = [("web", web), ("scheduler", [*taskiq, "scheduler", args.scheduler, *args.tasks])]
    for n in range(1, args.receivers + 1):
        worker = [*taskiq, "worker", args.broker, *args.tasks]
        worker += ["--workers", str(args.receiver_workers)]
        commands.append((f"receiver@{n}", worker))
    return commands


def run(args: argparse.Namespace) -> int:
    stop = threading.Event()

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        if stop.is_set():
            return
        _say("dev", f"{signal.Signals(signum).name}: stopping everything")
        stop.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)

    bootstrap_argv = shlex.split(args.bootstrap)
    if bootstrap_argv:
        bootstrap_argv[0] = _program(bootstrap_argv[0])
        one_time = Child("bootstrap", bootstrap_argv)
        while one_time.popen.poll() is None:
            if stop.wait(0.1):
                one_time.signal(signal.SIGINT)
                one_time.finish()
                return 130
        rc = one_time.finish()
        if rc != 0:
            _say("dev", f"bootstrap failed (exit {rc}): nothing else started")
            return rc

    children: list[Child] = []
    if not stop.is_set():
        for name, argv in build_commands(args):
            children.append(Child(name, argv))
    failed = False
    while not stop.wait(0.2):
        exited = [c for c in children if c.popen.poll() is not None]
        if exited:
            for c in exited:
                _say("dev", f"{c.name} exited on its own (exit {c.popen.returncode})")
            failed = True
            break

    for c in children:
        c.signal(signal.SIGINT)
    deadline = time.monotonic() + args.stop_timeout
    for c in children:
        try:
            c.popen.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            _say("dev", f"{c.name} still running after {args.stop_timeout:g} s: SIGKILL")
            c.signal(signal.SIGKILL)
        rc = c.finish()
        _say("dev", f"stopped {c.name} (exit {rc})")
    return 1 if failed else 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="xagent-dev",
        description=(
            "Run the app locally in its production layers: the one-time work once, then the "
            "web (with reload), one scheduler and the receivers as separate processes."
        ),
    )
    parser.add_argument("--host", default="127.0.0.1", help="web address (default: %(default)s)")
    parser.add_argument("--port", type=int, default=8000, help="web port (default: %(default)s)")
    parser.add_argument("--receivers", type=int, default=2, help="receiver processes (default: 2)")
    parser.add_argument(
        "--receiver-workers", type=int, default=1, help="children per receiver (default: 1)"
    )
    parser.add_argument(
        "--no-reload", dest="reload", action="store_false", help="no code reload for the web"
    )
    parser.add_argument("--web-app", default="xagent.main:app", help="ASGI app (module:attr)")
    parser.add_argument("--broker", default="xagent.broker:broker", help="TaskIQ broker")
    parser.add_argument(
        "--scheduler", default="xagent.scheduler:scheduler", help="TaskIQ scheduler"
    )
    parser.add_argument(
        "--tasks",
        nargs="+",
        default=["xagent.tasks"],
        metavar="MODULE",
        help="task modules the scheduler and the receivers import",
    )
    parser.add_argument(
        "--bootstrap",
        default="xagent-bootstrap all",
        help="one-time command, run first (empty: none; default: %(default)s)",
    )
    parser.add_argument(
        "--stop-timeout",
        type=float,
        default=30.0,
        help="seconds each process may take to stop before SIGKILL (default: %(default)s)",
    )
    args = parser.parse_args(argv)
    if args.receivers < 0 or args.receiver_workers < 1:
        parser.error("--receivers must be >= 0 and --receiver-workers >= 1")
    return run(args)


if __name__ == "__main__":
    raise SystemExit(main())
