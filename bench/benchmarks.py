"""The benchmarks P1-P6 (each: bundle and naive design, alternating, repeated)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
import urllib.request
from dataclasses import dataclass, field
from typing import Any

import naive
import p1
from lib import (
    APP,
    BARE_PORT,
    HOST_DIR,
    NAIVE_PORT,
    ORIGIN_PORT,
    ROOT,
    STATE,
    WEB_PORT,
    Host,
    loadavg,
    log,
    median,
    percentile,
    wait_status,
)
from lib import http_status as lib_http_status

SITE = str(ROOT / "playbooks" / "site.yml")
INVENTORY = str(ROOT / "bench" / "inventory")


@dataclass
class Context:
    host: Host
    origin: Any
    model: dict[str, Any]
    smoke: bool
    env: dict[str, str]
    results: dict[str, Any]
    p4: dict[str, Any] = field(default_factory=dict)


def playbook(ctx: Context, *extra: str, strategy: str | None = None) -> dict[str, Any]:
    """ansible-playbook site.yml against the bench host; seconds and the recap. The
    strategy is ansible.cfg's (xagent_linear: Mitogen) unless given."""
    env = dict(ctx.env, ANSIBLE_STRATEGY=strategy) if strategy else ctx.env
    t = time.monotonic()
    proc = subprocess.run(
        ["ansible-playbook", "-i", INVENTORY, SITE, *extra],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        check=False,
        timeout=1800,
    )
    seconds = time.monotonic() - t
    recap = re.search(r"ok=(\d+)\s+changed=(\d+)\s+unreachable=(\d+)\s+failed=(\d+)", proc.stdout)
    if proc.returncode != 0 or recap is None:
        raise RuntimeError(f"site.yml failed ({proc.returncode}):\n{proc.stdout[-4000:]}")
    ok, changed, _, failed = (int(x) for x in recap.groups())
    return {
        "seconds": round(seconds, 1),
        "ok": ok,
        "changed": changed,
        "failed": failed,
        "loadavg": loadavg(),
    }


def p4_first_converge(ctx: Context) -> None:
    log("creating the bench host and running the first converge (P4)")
    ctx.host.create()
    ctx.p4["first_converge"] = playbook(ctx)
    log(f"first converge: {ctx.p4['first_converge']}")


def run_p1(ctx: Context) -> dict[str, Any]:
    if ctx.smoke:
        return p1.run_p1(ctx.host, reps=1, seconds=3, rate=100, ms=20)
    return p1.run_p1(ctx.host, reps=3, seconds=8, rate=200, ms=20)


# --- shared helpers -----------------------------------------------------------------
WEB_UNIT = f"{APP}-web.service"
SCHEDULER_UNIT = f"{APP}-scheduler.service"
BOOTSTRAP_UNIT = f"{APP}-bootstrap.service"
TARGET = f"{APP}.target"
WEB_DROPIN_DIR = f"/run/systemd/system/{WEB_UNIT}.d"
MODELS_DIR = f"/var/lib/{APP}/models"


def set_web_workers(host: Host, workers: int | None) -> None:
    """Runtime drop-in: gunicorn reads GUNICORN_CMD_ARGS after its config file, so this
    overrides the rendered `workers` without a deploy (None: back to the deployed value)."""
    if workers is None:
        host.sh(f"rm -f {WEB_DROPIN_DIR}/bench.conf; systemctl daemon-reload")
    else:
        host.sh(
            f"mkdir -p {WEB_DROPIN_DIR} && printf '[Service]\\n"
            f"Environment=GUNICORN_CMD_ARGS=--workers={workers}\\n'"
            f" > {WEB_DROPIN_DIR}/bench.conf && systemctl daemon-reload"
        )


def web_worker_pids(host: Host, unit: str = WEB_UNIT) -> list[int]:
    main = host.systemctl("show", "-p", "MainPID", "--value", unit).strip()
    if not main or main == "0":
        return []
    out = host.sh(f"pgrep -P {main} || true")
    return [int(x) for x in out.split()]


def wait_workers(host: Host, n: int, unit: str = WEB_UNIT, timeout: float = 120) -> None:
    t = time.monotonic()
    while time.monotonic() - t < timeout:
        if len(web_worker_pids(host, unit)) >= n:
            return
        time.sleep(0.2)
    raise TimeoutError(f"{unit}: fewer than {n} workers after {timeout} s")


def healthz_pid(port: int) -> int | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1) as resp:
            return int(json.loads(resp.read())["pid"])
    except (OSError, ValueError, KeyError):
        return None


def stop_bundle_workers(host: Host) -> None:
    """Receivers and scheduler off while the naive design (which runs its own) is measured."""
    host.systemctl("stop", SCHEDULER_UNIT, *p1.RECEIVERS)


def start_bundle_workers(host: Host) -> None:
    host.systemctl("start", SCHEDULER_UNIT)
    p1.restart_receivers(host, "start")


def count_lines(lines: list[str], needle: str) -> int:
    return sum(needle in line for line in lines)


def origin_bytes(ctx: Context) -> int:
    return int(sum(ctx.origin.call("/_stats")["bytes"].values()))


def model_url(ctx: Context) -> str:
    return f"http://127.0.0.1:{ORIGIN_PORT}/{ctx.model['name']}"


def model_file(ctx: Context) -> str:
    """The bundle's name for the model file (content-addressed: xagent.models)."""
    return f"{ctx.model['name']}@{ctx.model['sha256'][:32]}"


# --- P2: cold start with a large model ---------------------------------------------


def p2_bundle(ctx: Context, workers: int, limit: float) -> dict[str, Any]:
    host = ctx.host
    set_web_workers(host, workers)
    host.systemctl("stop", TARGET, BOOTSTRAP_UNIT)
    host.sh(f"rm -f {MODELS_DIR}/{ctx.model['name']}@* {MODELS_DIR}/.{ctx.model['name']}@*")
    ctx.origin.call("/_reset", "POST")
    since = host.now_usec()
    t0 = time.monotonic()
    host.systemctl("start", "--no-block", TARGET)
    out: dict[str, Any] = {"loadavg": loadavg()}
    try:
        out["ready_s"] = round(wait_status(f"http://127.0.0.1:{WEB_PORT}/readyz", timeout=limit), 2)
    except TimeoutError:
        out["ready_s"] = None
    out["bytes"] = origin_bytes(ctx)
    web_log = host.journal_since(WEB_UNIT, since)
    out["worker_timeouts"] = count_lines(web_log, "WORKER TIMEOUT")
    out["workers_booted"] = count_lines(web_log, "Booting worker")
    out["downloads_started"] = count_lines(host.journal_since(BOOTSTRAP_UNIT, since), "downloading")
    out["seconds_observed"] = round(time.monotonic() - t0, 1)
    return out


def p2_naive(ctx: Context, workers: int, limit: float, seed_timing: bool) -> dict[str, Any]:
    host = ctx.host
    ctx.origin.call("/_reset", "POST")
    since = host.now_usec()
    t0 = time.monotonic()
    naive.start(
        host,
        workers=workers,
        models=[{"name": ctx.model["name"], "url": model_url(ctx)}],
        seed_timing=seed_timing,
        wait=False,
    )
    out: dict[str, Any] = {"loadavg": loadavg()}
    try:
        out["ready_s"] = round(
            wait_status(f"http://127.0.0.1:{NAIVE_PORT}/readyz", timeout=limit), 2
        )
    except TimeoutError:
        out["ready_s"] = None
    out["bytes"] = origin_bytes(ctx)
    lines = host.journal_since(naive.UNIT, since)
    out["worker_timeouts"] = count_lines(lines, "WORKER TIMEOUT")
    out["workers_booted"] = count_lines(lines, "Booting worker")
    out["downloads_started"] = count_lines(lines, "downloading model")
    out["seconds_observed"] = round(time.monotonic() - t0, 1)
    naive.stop(host)
    return out


def run_p2(ctx: Context) -> dict[str, Any]:
    workers = 4
    size = ctx.model["size"]
    mbps = 200.0 if ctx.smoke else 50.0
    reps = 1 if ctx.smoke else 2
    one = size / (mbps * 1e6)
    ctx.origin.call(f"/_rate?mbps={mbps}", "POST")
    out: dict[str, Any] = {
        "params": {"model_bytes": size, "workers": workers, "origin_mbps": mbps, "reps": reps},
        "reps": [],
    }
    try:
        for rep in range(reps):
            r: dict[str, Any] = {}
            log(f"P2 rep {rep + 1}/{reps}: bundle cold start")
            r["bundle"] = p2_bundle(ctx, workers, limit=one * 3 + 120)
            stop_bundle_workers(ctx.host)
            log(f"P2 rep {rep + 1}: naive cold start (gunicorn 27)")
            r["naive"] = p2_naive(ctx, workers, limit=one * workers * 2 + 60, seed_timing=False)
            if rep == 0:
                log(f"P2 rep {rep + 1}: naive cold start, timeout clock from fork (gunicorn <= 21)")
                r["naive_seed"] = p2_naive(
                    ctx, workers, limit=max(one * workers * 1.5, 40), seed_timing=True
                )
            start_bundle_workers(ctx.host)
            for k, v in r.items():
                log(f"P2 rep {rep + 1} {k}: {v}")
            out["reps"].append(r)
    finally:
        ctx.origin.call("/_rate?mbps=0", "POST")
        set_web_workers(ctx.host, None)
        ctx.host.systemctl("restart", WEB_UNIT)
        wait_status(f"http://127.0.0.1:{WEB_PORT}/readyz", timeout=120)
    for k in ("bundle", "naive"):
        out[f"{k}_median_ready_s"] = median(
            [r[k]["ready_s"] for r in out["reps"] if r[k]["ready_s"] is not None]
        )
        out[f"{k}_bytes_x_model"] = round(median([r[k]["bytes"] for r in out["reps"]]) / size, 2)
    return out


# --- P3: warm restart ------------------------------------------------------------------


def bare_boot(ctx: Context) -> dict[str, Any]:
    """The app alone: import time, and one uvicorn process from exec to /readyz 200,
    with the same settings and secrets as the web unit."""
    host = ctx.host
    imp = host.sh(
        f"cd /var/lib/{APP} && set -a && . /etc/{APP}/{APP}.env && set +a && "
        f"XAGENT_DATABASE_PASSWORD=$(cat /etc/{APP}/credentials/database_password) "
        f"XAGENT_REDIS_PASSWORD=$(cat /etc/{APP}/credentials/redis_password) "
        f"runuser -u {APP} -- /opt/{APP}/current/venv/bin/python -c "
        "'import time; t = time.perf_counter(); import xagent.main; print(time.perf_counter() - t)'"
    )
    unit = "xagent-bench-bare.service"
    url = f"http://127.0.0.1:{BARE_PORT}/readyz"
    # BARE_PORT is below the kernel's ephemeral range (docs/contract.md): no client
    # connection's source port can hold it, so one start either answers or is a bug
    host.sh(
        f"systemctl stop {unit} 2>/dev/null || true; "
        f"systemctl reset-failed {unit} 2>/dev/null || true"
    )
    t0 = time.monotonic()
    host.sh(
        f"systemd-run --quiet --unit={unit} -p User={APP} -p WorkingDirectory=/var/lib/{APP} "
        f"-p EnvironmentFile=/etc/{APP}/{APP}.env "
        f"-p LoadCredential=database_password:/etc/{APP}/credentials/database_password "
        f"-p LoadCredential=redis_password:/etc/{APP}/credentials/redis_password "
        f"/opt/{APP}/current/venv/bin/python -m uvicorn xagent.main:app "
        f"--host 127.0.0.1 --port {BARE_PORT} --no-access-log"
    )
    boot, checked = None, t0
    while time.monotonic() - t0 < 60:
        if lib_http_status(url, timeout=1.0) == 200:
            boot = time.monotonic() - t0
            break
        if time.monotonic() - checked > 0.5:  # a docker exec: not on every poll
            checked = time.monotonic()
            if host.sh(f"systemctl is-failed {unit} || true").strip() == "failed":
                break
        time.sleep(0.02)
    host.sh(f"systemctl stop {unit} 2>/dev/null || true")
    if boot is None:
        journal = host.sh(f"journalctl -u {unit} -n 20 --no-pager -o cat || true")
        raise RuntimeError(f"{unit} never answered {url}; its journal:\n{journal}")
    return {"import_s": round(float(imp.strip().splitlines()[-1]), 3), "boot_s": round(boot, 3)}


def restart_to_ready(ctx: Context, port: int, action: Any) -> float:
    """Seconds from issuing a restart until /readyz is 200 from a NEW process."""
    old = set(web_worker_pids(ctx.host, WEB_UNIT if port == WEB_PORT else naive.UNIT))
    t0 = time.monotonic()
    action()
    while time.monotonic() - t0 < 300:
        pid = healthz_pid(port)
        new = pid is not None and pid not in old
        if new and lib_http_status(f"http://127.0.0.1:{port}/readyz") == 200:
            return time.monotonic() - t0
        time.sleep(0.02)
    raise TimeoutError("no new process answered /readyz within 300 s")


def web_phases(host: Host, since_usec: int) -> dict[str, float]:
    """Where a web restart's time went, from the unit's journal: the old web's stop
    (drain + graceful shutdown), the new master's start (READY=1), then the first worker's
    lifespan done ("Application startup complete")."""
    out = host.sh(
        f"journalctl --no-pager -o short-unix -u {WEB_UNIT} --since @{since_usec / 1e6:.6f}",
        check=False,
    )
    marks: dict[str, float] = {}
    for line in out.splitlines():
        ts = float(line.split(" ", 1)[0]) if line[:1].isdigit() else None
        if ts is None:
            continue
        for key, needle in (
            ("stopping", "Stopping "),
            ("stopped", "Stopped "),
            ("started", "Started "),
            ("worker_ready", "Application startup complete"),
        ):
            if needle in line and key not in marks:
                marks[key] = ts
    t0 = since_usec / 1e6
    phases = {}
    if {"stopping", "stopped"} <= marks.keys():
        phases["issue_to_stopping_s"] = round(marks["stopping"] - t0, 3)
        phases["stop_s"] = round(marks["stopped"] - marks["stopping"], 3)
    if {"stopped", "started"} <= marks.keys():
        phases["master_start_s"] = round(marks["started"] - marks["stopped"], 3)
    if {"started", "worker_ready"} <= marks.keys():
        phases["worker_boot_s"] = round(marks["worker_ready"] - marks["started"], 3)
    return phases


def run_p3(ctx: Context) -> dict[str, Any]:
    host = ctx.host
    reps = 1 if ctx.smoke else 4
    out: dict[str, Any] = {"params": {"reps": reps, "web_workers": 2}, "reps": []}
    for rep in range(reps):
        r: dict[str, Any] = {"loadavg": loadavg()}
        r["bare"] = bare_boot(ctx)
        since = host.now_usec()
        r["bundle_restart_s"] = round(
            restart_to_ready(
                ctx, WEB_PORT, lambda: host.systemctl("restart", "--no-block", TARGET)
            ),
            3,
        )
        r["bundle_phases"] = web_phases(host, since)
        # let the receivers finish starting before the next measurement
        wait_status(f"http://127.0.0.1:{WEB_PORT}/readyz", timeout=60)
        time.sleep(3)
        stop_bundle_workers(host)
        naive.start(host, workers=2, models=[{"name": ctx.model["name"], "url": model_url(ctx)}])
        r["naive_restart_s"] = round(
            restart_to_ready(
                ctx,
                NAIVE_PORT,
                lambda: naive.start(
                    host,
                    workers=2,
                    models=[{"name": ctx.model["name"], "url": model_url(ctx)}],
                    wait=False,
                ),
            ),
            3,
        )
        naive.stop(host)
        start_bundle_workers(host)
        r["bundle_vs_bare"] = round(r["bundle_restart_s"] / r["bare"]["boot_s"], 2)
        log(f"P3 rep {rep + 1}/{reps}: {r}")
        out["reps"].append(r)
    out["median"] = {
        "bare_import_s": median([r["bare"]["import_s"] for r in out["reps"]]),
        "bare_boot_s": median([r["bare"]["boot_s"] for r in out["reps"]]),
        "bundle_restart_s": median([r["bundle_restart_s"] for r in out["reps"]]),
        "naive_restart_s": median([r["naive_restart_s"] for r in out["reps"]]),
        "bundle_vs_bare": median([r["bundle_vs_bare"] for r in out["reps"]]),
    }
    return out


# --- P4: deploys ------------------------------------------------------------------------


def start_probe(host: Host, url: str, rate: int) -> None:
    host.sh(
        "systemctl stop bench-probe 2>/dev/null || true; "
        "systemctl reset-failed bench-probe 2>/dev/null || true; rm -f /tmp/bench-probe.json; "
        "systemd-run --quiet --unit=bench-probe -p CPUWeight=10000 "
        f"/usr/bin/python3 {HOST_DIR}/probe.py "
        f"--url {url} --rate {rate} --timeout 30 --out /tmp/bench-probe.json"
    )
    time.sleep(1)


def stop_probe(host: Host) -> dict[str, Any]:
    host.sh("systemctl kill -s TERM bench-probe")
    for _ in range(400):
        raw = host.sh("cat /tmp/bench-probe.json 2>/dev/null || true")
        if raw.strip():
            data = json.loads(raw)
            data.pop("ids", None)
            return dict(data)
        time.sleep(0.1)
    raise RuntimeError("probe wrote no summary")


def new_release_source(ctx: Context) -> str:
    """A copy of app/ with another version: a new wheel, so a new release id."""
    dest = STATE / "release-b"
    shutil.rmtree(dest, ignore_errors=True)
    shutil.copytree(
        ROOT / "app", dest, ignore=shutil.ignore_patterns("__pycache__", ".*cache", "tests")
    )
    pyproject = dest / "pyproject.toml"
    text = pyproject.read_text()
    version = f"0.1.{int(time.time())}"
    pyproject.write_text(re.sub(r'(?m)^version = ".*"$', f'version = "{version}"', text))
    return str(dest)


def run_p4(ctx: Context) -> dict[str, Any]:
    host = ctx.host
    out: dict[str, Any] = dict(ctx.p4)
    if not ctx.smoke:  # the same code path as the first converge: the smoke skips it
        log("P4: idempotent re-run")
        out["rerun"] = playbook(ctx)
        log(f"P4 rerun: {out['rerun']}")
        # the same re-run with Ansible's own strategy: what Mitogen saves
        out["rerun_linear"] = playbook(ctx, strategy="linear")
        log(f"P4 rerun (linear): {out['rerun_linear']}")
    src = new_release_source(ctx)
    rate = 50
    start_probe(host, f"http://127.0.0.1:{WEB_PORT}/healthz", rate)
    log("P4: new release under the probe")
    try:
        out["new_release"] = playbook(ctx, "-e", f"app_source_dir={src}")
    finally:
        out["new_release_probe"] = stop_probe(host)
    log(f"P4 new release: {out['new_release']} probe {out['new_release_probe']}")
    # the naive design has no release phase and no socket unit: a new release is a
    # restart of gunicorn, which closes its port and runs the one-time work again
    stop_bundle_workers(host)
    naive.start(host, workers=2, models=[{"name": ctx.model["name"], "url": model_url(ctx)}])
    start_probe(host, f"http://127.0.0.1:{NAIVE_PORT}/healthz", rate)
    t = time.monotonic()
    try:
        naive.start(host, workers=2, models=[{"name": ctx.model["name"], "url": model_url(ctx)}])
        time.sleep(1)
    finally:
        out["naive_restart_probe"] = stop_probe(host)
    out["naive_restart_s"] = round(time.monotonic() - t, 1)
    naive.stop(host)
    start_bundle_workers(host)
    log(f"P4 naive restart: {out['naive_restart_probe']}")
    first = out.get("first_converge", {}).get("seconds")
    if first and "rerun" in out:
        out["rerun_vs_first"] = round(out["rerun"]["seconds"] / first, 3)
        out["rerun_linear_vs_first"] = round(out["rerun_linear"]["seconds"] / first, 3)
    return out


# --- P5: task path ----------------------------------------------------------------------


def run_p5(ctx: Context) -> dict[str, Any]:
    host = ctx.host
    n_lat, rate = (50, 20) if ctx.smoke else (200, 20)
    n_tp = 300 if ctx.smoke else 2000
    out: dict[str, Any] = {
        "params": {"latency_tasks": n_lat, "rate": rate, "throughput_tasks": n_tp}
    }

    def lat() -> dict[str, Any]:
        res = host.helper("task-latency", "--n", str(n_lat), "--rate", str(rate))
        ms = [x * 1000 for x in res["latencies"]]
        return {
            "completed": res["completed"],
            "p50_ms": round(percentile(ms, 50), 2),
            "p99_ms": round(percentile(ms, 99), 2),
            "loadavg": loadavg(),
        }

    host.helper("purge")
    out["bundle_latency"] = lat()
    extra = [f"{APP}-receiver@3.service", f"{APP}-receiver@4.service"]
    tp: dict[str, Any] = {}
    try:
        for instances in (1, 2, 4):
            if instances == 1:
                host.systemctl("stop", p1.RECEIVERS[1])
            elif instances == 2:
                host.systemctl("start", p1.RECEIVERS[1])
            else:
                host.systemctl("start", *extra)
            time.sleep(4)  # children import the app
            res = host.helper("throughput", "--n", str(n_tp))
            tp[str(instances)] = {**res, "loadavg": loadavg()}
            log(f"P5 bundle throughput with {instances} instance(s): {res['tasks_per_s']} tasks/s")
    finally:
        host.systemctl("stop", *extra)
        host.systemctl("start", p1.RECEIVERS[1])
    out["bundle_throughput"] = tp
    stop_bundle_workers(host)
    try:
        naive.start(host, workers=2)
        time.sleep(2)
        out["naive_latency"] = lat()
        res = host.helper("throughput", "--n", str(n_tp))
        out["naive_throughput"] = {**res, "loadavg": loadavg()}
    finally:
        naive.stop(host)
        start_bundle_workers(host)
    log(f"P5: {out}")
    return out


# --- P6: model memory -------------------------------------------------------------------


def run_p6(ctx: Context) -> dict[str, Any]:
    host = ctx.host
    model_path = f"{MODELS_DIR}/{model_file(ctx)}"
    units = [WEB_UNIT, SCHEDULER_UNIT, *p1.RECEIVERS]
    out: dict[str, Any] = {"params": {"model_bytes": ctx.model["size"]}, "bundle": {}, "naive": {}}
    try:
        for n in (1, 2) if ctx.smoke else (1, 2, 4):
            set_web_workers(host, n)
            host.systemctl("restart", WEB_UNIT)
            wait_status(f"http://127.0.0.1:{WEB_PORT}/readyz", timeout=120)
            wait_workers(host, n)
            time.sleep(2)
            out["bundle"][str(n)] = host.helper(
                "pss", "--units", " ".join(units), "--model", model_file(ctx)
            )
            stop_bundle_workers(host)
            naive.start(host, workers=n, files=[model_path])
            wait_workers(host, n, naive.UNIT)
            time.sleep(2)
            out["naive"][str(n)] = host.helper("pss", "--units", naive.UNIT)
            naive.stop(host)
            start_bundle_workers(host)
            mb = 1e6
            log(
                f"P6 N={n}: bundle {out['bundle'][str(n)]['total']['Pss'] / mb:.0f} MB, "
                f"naive {out['naive'][str(n)]['total']['Pss'] / mb:.0f} MB"
            )
    finally:
        set_web_workers(host, None)
        host.systemctl("restart", WEB_UNIT)
        wait_status(f"http://127.0.0.1:{WEB_PORT}/readyz", timeout=120)
    return out
