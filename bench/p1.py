"""P1: web latency while receivers saturate every core, bundle vs naive."""

from __future__ import annotations

import time
from typing import Any

import naive
from lib import APP, NAIVE_PORT, WEB_PORT, Host, h2load, loadavg, log, median

RECEIVER_TEMPLATE = f"{APP}-receiver@.service"
RECEIVERS = [f"{APP}-receiver@1.service", f"{APP}-receiver@2.service"]
DROPIN = "bench-p1.conf"

# Receiver CPU settings compared in one run. "defaults": what the roles deploy.
# "equal": receivers and their slice at the web's weight, normal scheduling: the
# reference for task throughput.
# "previous": the role defaults before P1 (web 100, receivers 20 in a slice left at
# the default weight 100, normal scheduling), to show what the change bought.
VARIANTS: dict[str, dict[str, str]] = {
    "equal": {
        "service": "[Service]\nCPUWeight=100\nCPUSchedulingPolicy=other\n",
        "slice": "[Slice]\nCPUWeight=100\n",
        "cpu_idle": "0",
    },
    "previous": {
        "service": "[Service]\nCPUWeight=20\nCPUSchedulingPolicy=other\n",
        "slice": "[Slice]\nCPUWeight=100\n",
        "cpu_idle": "0",
    },
}


def receiver_slice(host: Host) -> str:
    return host.systemctl("show", "-p", "Slice", "--value", RECEIVERS[0]).strip()


def apply_variant(host: Host, variant: str | None) -> None:
    """Runtime drop-ins (under /run, gone at reboot) for the receivers and their slice;
    None removes them. Receivers restart to pick up scheduling policy changes."""
    slc = receiver_slice(host)
    dirs = [f"/run/systemd/system/{RECEIVER_TEMPLATE}.d", f"/run/systemd/system/{slc}.d"]
    script = " ".join(f"rm -f '{d}/{DROPIN}';" for d in dirs)
    if variant is not None:
        spec = VARIANTS[variant]
        for d, key in zip(dirs, ("service", "slice"), strict=True):
            if spec.get(key):
                script += f" mkdir -p '{d}' && printf '%s' '{spec[key]}' > '{d}/{DROPIN}';"
    host.sh(script + " systemctl daemon-reload")
    restart_receivers(host)
    # after the restart: the receiver unit's ExecStartPre sets cpu.idle=1 (cgroup v1)
    if variant is not None and "cpu_idle" in VARIANTS[variant]:
        host.sh(f"echo {VARIANTS[variant]['cpu_idle']} > '{host.cgroup_path(slc)}/cpu.idle'")


def restart_receivers(host: Host, action: str = "restart", timeout: float = 90) -> None:
    """(Re)start the receivers and wait until each child logged "Listening started"."""
    since = host.now_usec()
    host.systemctl(action, *RECEIVERS)
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        counts = [
            sum("Listening started" in line for line in host.journal_since(u, since))
            for u in RECEIVERS
        ]
        if all(c >= 2 for c in counts):
            return
        time.sleep(0.5)
    log(f"warning: receivers not all listening after {timeout} s: {counts}")


def loaded_run(
    host: Host,
    url: str,
    rate: int,
    seconds: float,
    task: str,
    ms: int,
    cpu_unit: str,
    concurrency: int,
) -> dict[str, Any]:
    """Enqueue a backlog that keeps every receiver busy past the window, measure the web
    under it, count the tasks acked and the CPU time the receivers got during the window
    (``cpu_unit``: their slice, or the naive unit), then discard the rest.

    burn_cpu(ms) runs for ``ms`` of WALL time, so tasks/s counts preempted tasks as done;
    the receivers' CPU time is the work they really did (task-equivalents = CPU s / ms).
    For the same reason the backlog is sized by how many tasks run at once
    (``concurrency``: processes, or threads of the naive design's pools)."""
    backlog = int(concurrency * (seconds + 5) * 1000 / ms * 1.2)
    host.helper("enqueue", "--n", str(backlog), "--ms", str(ms), "--task", task)
    time.sleep(2.0)  # every receiver process busy
    before = host.helper("progress")
    t0 = time.monotonic()
    res = h2load(host, url, rate, seconds, cpu_cgroup=host.cgroup_of(cpu_unit))
    elapsed = time.monotonic() - t0
    after = host.helper("progress")
    host.helper("purge")
    out = res.summary()
    out["tasks_per_s"] = round((after["acked"] - before["acked"]) / elapsed, 1)
    out["worker_cpu_cores"] = round(res.cpu_cores, 3)
    # the bench host as a whole, and every process outside it (the neighbours)
    out["host_cpu_cores"] = round(res.host_cores, 3)
    out["neighbour_cpu_cores"] = round(res.neighbour_cores, 3)
    out["task_equiv_per_s"] = round(res.cpu_cores / (ms / 1000), 1)
    out["backlog_left"] = after["lag"] + after["pending"]
    return out


def idle_run(host: Host, url: str, rate: int, seconds: float, cpu_unit: str) -> dict[str, Any]:
    res = h2load(host, url, rate, seconds, cpu_cgroup=host.cgroup_of(cpu_unit))
    out = res.summary()
    out["host_cpu_cores"] = round(res.host_cores, 3)
    out["neighbour_cpu_cores"] = round(res.neighbour_cores, 3)
    return out


def run_p1(host: Host, reps: int, seconds: float, rate: int, ms: int) -> dict[str, Any]:
    web = f"http://127.0.0.1:{WEB_PORT}/healthz"
    naive_url = f"http://127.0.0.1:{NAIVE_PORT}/healthz"
    slc = receiver_slice(host)
    apply_variant(host, None)  # no drop-in left over from an interrupted run
    effective = {
        "web": host.cpu_values(f"{APP}-web.service"),
        "receiver_slice": {"name": slc, **host.cpu_values(slc)},
        "receiver": host.cpu_values(RECEIVERS[0]),
        "receiver_policy": host.sh(
            f"chrt -p $(systemctl show -p MainPID --value {RECEIVERS[0]}) | head -1"
        ).strip(),
    }
    log(f"P1 effective cgroup values (role defaults): {effective}")
    reps_out = []
    for rep in range(reps):
        r: dict[str, Any] = {"loadavg_start": loadavg()}
        host.helper("purge")
        log(f"P1 rep {rep + 1}/{reps}: bundle idle")
        r["bundle_idle"] = idle_run(host, web, rate, seconds, slc)
        log(f"P1 rep {rep + 1}: bundle loaded (role defaults)")
        r["bundle_loaded"] = loaded_run(host, web, rate, seconds, "xagent.burn_cpu", ms, slc, 4)
        log(f"P1 rep {rep + 1}: bundle loaded, equal weights")
        apply_variant(host, "equal")
        r["equal_loaded"] = loaded_run(host, web, rate, seconds, "xagent.burn_cpu", ms, slc, 4)
        if rep == 0:  # once: it only shows what the change bought
            log(f"P1 rep {rep + 1}: bundle loaded, the previous role defaults")
            apply_variant(host, "previous")
            r["previous_loaded"] = loaded_run(
                host, web, rate, seconds, "xagent.burn_cpu", ms, slc, 4
            )
        apply_variant(host, None)
        # the naive design: receivers and scheduler inside the web workers
        host.systemctl("stop", f"{APP}-scheduler.service", *RECEIVERS)
        try:
            naive.start(host, workers=2)
            log(f"P1 rep {rep + 1}: naive idle")
            r["naive_idle"] = idle_run(host, naive_url, rate, seconds, naive.UNIT)
            log(f"P1 rep {rep + 1}: naive loaded, async tasks in the web loop")
            r["naive_async_loaded"] = loaded_run(
                host, naive_url, rate, seconds, "xagent.burn_cpu", ms, naive.UNIT, 2
            )
            log(f"P1 rep {rep + 1}: naive loaded, sync tasks in a thread pool")
            r["naive_sync_loaded"] = loaded_run(
                host, naive_url, rate, seconds, "bench.burn_cpu_sync", ms, naive.UNIT, 12
            )
        finally:
            naive.stop(host)
            host.systemctl("start", f"{APP}-scheduler.service")
            restart_receivers(host, "start")
        r["loadavg_end"] = loadavg()
        pairs = [(k, "bundle_idle") for k in ("bundle_loaded", "equal_loaded", "previous_loaded")]
        pairs += [(k, "naive_idle") for k in ("naive_async_loaded", "naive_sync_loaded")]
        for k, idle in pairs:
            if k in r:
                r[k]["p99_ratio"] = round(r[k]["p99_ms"] / r[idle]["p99_ms"], 3)
                r[k]["p50_ratio"] = round(r[k]["p50_ms"] / r[idle]["p50_ms"], 3)
        # the work receivers got done: their CPU time, against the equal-weight run
        eq = max(r["equal_loaded"]["worker_cpu_cores"], 1e-9)
        r["throughput_vs_equal"] = round(r["bundle_loaded"]["worker_cpu_cores"] / eq, 3)
        if "previous_loaded" in r:
            prev = r["previous_loaded"]["worker_cpu_cores"]
            r["previous_throughput_vs_equal"] = round(prev / eq, 3)
        log(
            "P1 rep {}: p99 idle {:.1f} ms, loaded {:.2f}x (equal {:.2f}x), throughput "
            "{:.0%} of equal; naive async {:.1f}x, sync {:.1f}x".format(
                rep + 1,
                r["bundle_idle"]["p99_ms"],
                r["bundle_loaded"]["p99_ratio"],
                r["equal_loaded"]["p99_ratio"],
                r["throughput_vs_equal"],
                r["naive_async_loaded"]["p99_ratio"],
                r["naive_sync_loaded"]["p99_ratio"],
            )
        )
        reps_out.append(r)
    summary = {
        k: median([r[k]["p99_ratio"] for r in reps_out if k in r])
        for k in (
            "bundle_loaded",
            "equal_loaded",
            "previous_loaded",
            "naive_async_loaded",
            "naive_sync_loaded",
        )
    }
    summary["throughput_vs_equal"] = median([r["throughput_vs_equal"] for r in reps_out])
    return {
        "params": {"reps": reps, "seconds": seconds, "rate": rate, "task_ms": ms},
        "effective": effective,
        "reps": reps_out,
        "median_p99_ratio": summary,
    }
