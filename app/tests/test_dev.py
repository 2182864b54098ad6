"""``xagent-dev``: the production layers locally (one-time work once, then web, scheduler and
receivers as separate processes), against the test PostgreSQL and Redis."""

from __future__ import annotations

import os
import re
import signal
from pathlib import Path

import httpx

from conftest import BIN, HTTP_TIMEOUT, Proc, base_env, free_port, sql, wait_until


def _pids(proc: Proc) -> dict[str, int]:
    return {m[0]: int(m[1]) for m in re.findall(r"started (\S+) \(pid (\d+)\)", proc.log())}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie is gone for our purpose (its parent has not reaped it yet)
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"


def _parent(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def _answers(url: str) -> bool:
    """200 from ``url``; a web that does not answer yet (still starting) is no error."""
    try:
        return httpx.get(url, timeout=5).status_code == 200
    except httpx.TransportError:
        return False


def _start(env: dict[str, str], tmp_path: Path, *args: str) -> tuple[Proc, str]:
    port = free_port()
    argv = [str(BIN / "xagent-dev"), "--port", str(port), "--stop-timeout", "20", *args]
    return Proc("dev", argv, env, tmp_path), f"http://127.0.0.1:{port}"


def test_one_time_work_once_then_separate_processes_and_a_clean_stop(
    fresh_db: str, queue_name: str, tmp_path: Path
) -> None:
    env = base_env(fresh_db, queue_name, tmp_path / "models")
    dev, url = _start(env, tmp_path, "--receivers", "2")
    try:
        # every process up before the Ctrl-C below: one still importing dies of the
        # KeyboardInterrupt (exit 1), which is not what this test is about
        for name, ready in [
            ("receiver@1", "Listening started"),
            ("receiver@2", "Listening started"),
            ("scheduler", "Startup completed"),
            ("web", "Application startup complete"),
        ]:
            dev.wait_for_log(rf"(?m)^{re.escape(name)}\s*\|.*{ready}", timeout=60)
        wait_until(lambda: _answers(f"{url}/healthz"), timeout=30, what="the web")
        pids = _pids(dev)
        assert set(pids) == {"bootstrap", "web", "scheduler", "receiver@1", "receiver@2"}
        # the one-time work ran once, in its own process, before the others started
        log = dev.log()
        assert log.index("bootstrap done") < log.index("started web")
        assert sql(fresh_db, "SELECT count(*) AS n FROM bootstrap_runs")[0]["n"] == 1
        # separate processes: a run posted to the web is executed by a receiver's child
        resp = httpx.post(
            f"{url}/runs",
            json={"tool": "calculator", "args": {"op": "add", "a": 2, "b": 3}},
            timeout=HTTP_TIMEOUT,
        )
        assert resp.status_code == 202, resp.text
        run_id = resp.json()["id"]
        body = wait_until(
            lambda: (
                (r := httpx.get(f"{url}/runs/{run_id}", timeout=HTTP_TIMEOUT).json())["status"]
                in {"done", "failed"}
                and r
            ),
            timeout=30,
            what=f"run {run_id}",
        )
        assert body["status"] == "done"
        assert body["result"] == {"value": 5}
        assert _parent(body["worker_pid"]) in {pids["receiver@1"], pids["receiver@2"]}
        assert re.search(r"(?m)^web\s*\|", log)
        assert re.search(r"(?m)^scheduler\s*\|", log)
        # Ctrl-C: everything stops cleanly, nothing is left
        dev.popen.send_signal(signal.SIGINT)
        assert dev.popen.wait(timeout=60) == 0, dev.log()[-4000:]
        log = dev.log()
        for name in ("web", "scheduler", "receiver@1", "receiver@2"):
            assert re.search(rf"stopped {re.escape(name)} \(exit 0\)", log), log[-4000:]
            assert not _alive(pids[name]), name
        assert "SIGKILL" not in log
        assert sql(fresh_db, "SELECT count(*) AS n FROM bootstrap_runs")[0]["n"] == 1
    finally:
        dev.stop(signal.SIGINT, timeout=30)


def test_failed_one_time_work_starts_nothing(
    fresh_db: str, queue_name: str, tmp_path: Path
) -> None:
    env = base_env(fresh_db, queue_name, tmp_path / "models")
    del env["XAGENT_ROOT_PASSWORD"]  # the root-user step cannot work without it
    dev, url = _start(env, tmp_path)
    try:
        rc = dev.popen.wait(timeout=60)
        log = dev.log()
        assert rc != 0, log
        assert "bootstrap failed" in log
        assert "nothing else started" in log
        assert set(_pids(dev)) == {"bootstrap"}
        try:
            httpx.get(f"{url}/healthz", timeout=1)
            raise AssertionError("something answers on the web port")
        except httpx.ConnectError:
            pass
    finally:
        dev.stop()


def test_a_process_that_dies_stops_the_others(
    fresh_db: str, queue_name: str, tmp_path: Path
) -> None:
    env = base_env(fresh_db, queue_name, tmp_path / "models")
    dev, _ = _start(env, tmp_path, "--receivers", "1", "--no-reload")
    try:
        dev.wait_for_log(r"receiver@1\s*\|.*Listening started", timeout=60)
        pids = _pids(dev)
        os.kill(pids["receiver@1"], signal.SIGKILL)
        assert dev.popen.wait(timeout=60) == 1, dev.log()[-4000:]
        log = dev.log()
        assert "receiver@1 exited on its own" in log
        for name in ("web", "scheduler"):
            assert not _alive(pids[name]), name
    finally:
        dev.stop()
