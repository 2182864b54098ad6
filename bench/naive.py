"""The naive design as a transient unit in the benchmark host (same release, same venv)."""

from __future__ import annotations

import json
import shlex

from lib import APP, HOST_DIR, NAIVE_PORT, Host, wait_status

UNIT = "xagent-bench-naive.service"
ENV_FILE = "/run/xagent-bench/naive.env"


def start(
    host: Host,
    *,
    workers: int = 2,
    receiver: bool = True,
    models: list[dict[str, str]] | None = None,
    files: list[str] | None = None,
    seed_timing: bool = False,
    timeout: int = 30,
    wait: bool = True,
    ready_timeout: float = 300,
) -> float:
    """Start gunicorn with the naive app (scheduler + receiver in every worker's lifespan,
    models fetched per worker). Returns seconds until /readyz answered 200 (0 if not
    waited for). ``timeout`` is gunicorn's worker timeout (its default, 30 s, as in the
    seed); ``seed_timing`` starts that clock at fork, as gunicorn <= 21 did."""
    stop(host)
    # the app's own model check off: the lifespan's download stands for the model
    host.sh(
        f"mkdir -p /run/xagent-bench && grep -v '^XAGENT_MODELS=' /etc/{APP}/{APP}.env > {ENV_FILE}"
        f" && echo \"XAGENT_MODELS='[]'\" >> {ENV_FILE}"
    )
    env = {
        "PYTHONPATH": HOST_DIR,
        "BENCH_NAIVE_MODELS": json.dumps(models or []),
        "BENCH_NAIVE_MODELS_FILES": json.dumps(files or []),
        "BENCH_NAIVE_RECEIVER": "1" if receiver else "0",
    }
    props = [
        f"User={APP}",
        f"Group={APP}",
        f"WorkingDirectory=/var/lib/{APP}",
        f"EnvironmentFile={ENV_FILE}",
        f"LoadCredential=database_password:/etc/{APP}/credentials/database_password",
        f"LoadCredential=redis_password:/etc/{APP}/credentials/redis_password",
        "KillMode=mixed",
        "TimeoutStopSec=20",
    ]
    argv = [
        f"/opt/{APP}/current/venv/bin/gunicorn",
        "-k",
        "uvicorn_worker.UvicornWorker",
        "-w",
        str(workers),
        "-b",
        f"127.0.0.1:{NAIVE_PORT}",
        "--timeout",
        str(timeout),
        "--graceful-timeout",
        "5",
        "--access-logfile",
        "-",
        "--no-control-socket",
    ]
    if seed_timing:
        argv += ["-c", f"{HOST_DIR}/seed_gunicorn.py"]
    argv.append("naive_app:app")
    cmd = ["systemd-run", "--quiet", f"--unit={UNIT}"]
    cmd += [f"--property={p}" for p in props]
    cmd += [f"--setenv={k}={v}" for k, v in env.items()]
    host.sh(shlex.join(cmd + argv))
    if not wait:
        return 0.0
    return wait_status(f"http://127.0.0.1:{NAIVE_PORT}/readyz", timeout=ready_timeout)


def stop(host: Host) -> None:
    host.sh(
        f"systemctl stop {UNIT} 2>/dev/null || true; "
        f"systemctl reset-failed {UNIT} 2>/dev/null || true"
    )
