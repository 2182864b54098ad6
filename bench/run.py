#!/usr/bin/env python3
"""Benchmarks of the bundle's design against the naive (seed article) design.

    .venv/bin/python bench/run.py              everything (~20 min), then docs/benchmarks.md
    .venv/bin/python bench/run.py --smoke      one short repetition of each (make bench-smoke)
    .venv/bin/python bench/run.py --only P1,P5 --keep    some benchmarks; keep the host

One systemd container (xagent-bench, host networking, ports 30000/30001/30002 web,
30379 redis, 30432 postgresql, 30099 model origin, 30022 its sshd) gets the bundle through
playbooks/site.yml; the naive design runs in the same host from the same release, so both
designs meet the same kernel, CPUs and background load, alternating within each
repetition. Results: bench/results/<smoke|full>.json; docs/benchmarks.md and its plots are
rendered from the full results (bench/report.py).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import lib
from lib import BENCH, ORIGIN_PORT, ROOT, STATE, Host, log, write_json

ALL = ["P4", "P1", "P2", "P3", "P5", "P6"]


def make_model(size: int) -> dict[str, Any]:
    """A generated model file (random bytes) of ``size`` bytes, reused while it fits."""
    meta_path = STATE / "model.json"
    model = STATE / "models" / "bench-model.bin"
    if meta_path.exists() and model.exists() and model.stat().st_size == size:
        meta = json.loads(meta_path.read_text())
        if meta.get("size") == size:
            return dict(meta)
    model.parent.mkdir(parents=True, exist_ok=True)
    log(f"generating a {size / 1e6:.0f} MB model")
    digest = hashlib.sha256()
    with model.open("wb") as fh:
        left = size
        while left > 0:
            chunk = os.urandom(min(left, 8 << 20))
            fh.write(chunk)
            digest.update(chunk)
            left -= len(chunk)
    meta = {"name": model.name, "size": size, "sha256": digest.hexdigest()}
    meta_path.write_text(json.dumps(meta))
    return meta


class Origin:
    """bench/origin.py on loopback, a child of this process."""

    def __init__(self) -> None:
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(BENCH / "origin.py"), "--dir", str(STATE / "models"),
             "--port", str(ORIGIN_PORT)],
            stdout=subprocess.DEVNULL,
        )  # fmt: skip
        for _ in range(100):
            if lib.http_status(f"http://127.0.0.1:{ORIGIN_PORT}/_stats") == 200:
                return
            time.sleep(0.1)
        raise RuntimeError("model origin did not start")

    def call(self, path: str, method: str = "GET") -> dict[str, Any]:
        import urllib.request

        req = urllib.request.Request(f"http://127.0.0.1:{ORIGIN_PORT}{path}", method=method)
        with urllib.request.urlopen(req, timeout=10) as resp:
            return dict(json.loads(resp.read()))

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(timeout=10)
            self.proc = None


def ansible_env() -> dict[str, str]:
    env = dict(os.environ)
    env["BENCH_STATE"] = str(STATE)
    env["ANSIBLE_CONFIG"] = str(ROOT / "ansible.cfg")
    # a new container, so new host keys, every run (as Molecule's hosts)
    env["ANSIBLE_HOST_KEY_CHECKING"] = "False"
    env["PATH"] = f"{ROOT / '.venv' / 'bin'}:{env['PATH']}"
    return env


def machine() -> dict[str, Any]:
    return {
        "nproc": os.cpu_count(),
        "kernel": os.uname().release,
        "cpu": next(
            (
                line.split(":", 1)[1].strip()
                for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")
            ),
            "?",
        ),
        "mem_gb": round(int(Path("/proc/meminfo").read_text().split()[1]) / 1024 / 1024, 1),
        "loadavg_start": lib.loadavg(),
        "cgroup": "v2"
        if Path("/sys/fs/cgroup/cgroup.controllers").exists()
        else "v1 (hybrid)"
        if Path("/sys/fs/cgroup/unified").exists()
        else "v1",
    }


def validate(results: dict[str, Any], only: list[str]) -> list[str]:
    """What a smoke run must have produced: the harness works end to end. Numbers are not
    judged (no timed assertions), only that each benchmark measured something real."""
    problems: list[str] = []

    def need(cond: bool, what: str) -> None:
        if not cond:
            problems.append(what)

    if "P4" in only:
        p4 = results.get("P4", {})
        for k in (
            "first_converge",
            "new_release",
            "new_release_probe",
            "naive_restart_probe",
        ):
            need(k in p4, f"P4: no {k}")
        need(p4.get("new_release_probe", {}).get("sent", 0) > 0, "P4: the probe sent nothing")
    if "P1" in only:
        for r in results.get("P1", {}).get("reps", [{}]):
            for k in ("bundle_idle", "bundle_loaded", "equal_loaded", "naive_idle",
                      "naive_async_loaded", "naive_sync_loaded"):  # fmt: skip
                x = r.get(k, {})
                need(x.get("ok", 0) >= 0.9 * max(x.get("sent", 1), 1), f"P1 {k}: answers {x}")
                if k.endswith("_loaded"):
                    need(x.get("tasks_per_s", 0) > 0, f"P1 {k}: no task finished")
    if "P2" in only:
        size = results.get("P2", {}).get("params", {}).get("model_bytes", 1)
        for r in results.get("P2", {}).get("reps", [{}]):
            b, n = r.get("bundle", {}), r.get("naive", {})
            need(b.get("ready_s") is not None, "P2: the bundle never got ready")
            need(b.get("bytes", 0) >= size, f"P2: bundle fetched {b.get('bytes')} bytes")
            need(n.get("bytes", 0) >= size, f"P2: naive fetched {n.get('bytes')} bytes")
            need("naive_seed" in results["P2"]["reps"][0], "P2: no seed-timing run")
    if "P3" in only:
        med = results.get("P3", {}).get("median", {})
        need(med.get("bundle_restart_s", 0) > 0 and med.get("bare_boot_s", 0) > 0, f"P3: {med}")
    if "P5" in only:
        p5 = results.get("P5", {})
        n = p5.get("params", {}).get("latency_tasks", -1)
        need(p5.get("bundle_latency", {}).get("completed") == n, "P5: bundle tasks missing")
        need(p5.get("naive_latency", {}).get("completed") == n, "P5: naive tasks missing")
        need(sorted(p5.get("bundle_throughput", {})) == ["1", "2", "4"], "P5: throughput runs")
    if "P6" in only:
        for design in ("bundle", "naive"):
            for n_workers in ("1", "2"):
                x = results.get("P6", {}).get(design, {}).get(n_workers, {})
                need(x.get("total", {}).get("Pss", 0) > 0, f"P6 {design} N={n_workers}: no PSS")
    return problems


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="one short repetition of each")
    parser.add_argument("--only", default=",".join(ALL), help="comma-separated, e.g. P1,P5")
    parser.add_argument("--keep", action="store_true", help="keep the host container")
    parser.add_argument("--reuse", action="store_true", help="reuse a running host (no P4)")
    parser.add_argument("--no-report", action="store_true")
    args = parser.parse_args()
    # SIGTERM (CI stopping the job) runs the cleanup below too: origin, host container
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    only = [x.strip().upper() for x in args.only.split(",") if x.strip()]
    smoke = args.smoke
    started = time.monotonic()
    out_path = BENCH / "results" / ("smoke.json" if smoke else "full.json")
    results: dict[str, Any] = {
        "mode": "smoke" if smoke else "full",
        "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "machine": machine(),
        "commit": subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=False,
        ).stdout.strip(),
    }
    model_size = 16_000_000 if smoke else 500_000_000
    model = make_model(model_size)
    origin = Origin()
    origin.start()
    host = Host()
    try:
        import benchmarks

        ctx = benchmarks.Context(
            host=host, origin=origin, model=model, smoke=smoke, env=ansible_env(), results=results
        )
        if args.reuse and host.exists():
            host.push_helpers()
        else:
            benchmarks.p4_first_converge(ctx)
        host.install_tools()
        for name in [n for n in ALL if n in only]:
            t = time.monotonic()
            log(f"=== {name}")
            results[name] = getattr(benchmarks, f"run_{name.lower()}")(ctx)
            results[name]["bench_seconds"] = round(time.monotonic() - t, 1)
            write_json(out_path, results)
    finally:
        origin.stop()
        if not args.keep:
            host.remove()
    results["machine"]["loadavg_end"] = lib.loadavg()
    results["total_seconds"] = round(time.monotonic() - started, 1)
    write_json(out_path, results)
    log(f"results: {out_path} ({results['total_seconds']:.0f} s)")
    if not args.no_report:
        import report

        log(f"report: {report.render(results, smoke=smoke)}")
    if smoke:
        problems = validate(results, only)
        if problems:
            for p in problems:
                log(f"SMOKE FAILED: {p}")
            sys.exit(1)
        log("smoke: every benchmark measured, report rendered")


if __name__ == "__main__":
    main()
