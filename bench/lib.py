"""Shared pieces of the benchmark harness: the host container, the load generator, stats."""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import statistics
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
STATE = Path(os.environ.get("BENCH_STATE", BENCH / ".state"))
HOST = "xagent-bench"
IMAGE = "xagent-testhost:bookworm"
APP = "xagent"
WEB_PORT = 30000
NAIVE_PORT = 30001
BARE_PORT = 30002
ORIGIN_PORT = 30099
# The host's sshd: Ansible reaches the bench host over SSH, as it reaches a server.
SSH_PORT = 30022
SSH_KEY = STATE / "ssh" / "id_ed25519"
VENV_PY = f"/opt/{APP}/current/venv/bin/python"
HOST_DIR = "/opt/xagent-bench"
# Same flags as `make demo` / the Molecule platform (systemd as PID 1, host networking).
DOCKER_SYSTEMD_FLAGS = [
    "--network", "host", "--cgroupns", "host", "--cap-add", "SYS_ADMIN",
    "-v", "/sys/fs/cgroup:/sys/fs/cgroup:ro", "--tmpfs", "/run", "--tmpfs", "/run/lock",
    "--stop-signal", "SIGRTMIN+3",
]  # fmt: skip


# The bench host's own cgroup at the machine's root (cgroup v1 cpu controller), with a
# weight of its own. The machine is shared: jobs outside it compete with the bench host
# as a whole, and when receivers keep the host busy its whole group waits for its turn
# behind them, which no setting inside the host can change. A higher weight for the
# bench host keeps what is measured about the host's own units, not about the
# neighbours. 10240 = ten default containers.
CGROUP_PARENT = "xagent-bench"
CPU_SHARES = int(os.environ.get("BENCH_CPU_SHARES", "10240"))
# This machine (and so the host, which shares its cgroup tree) is cgroup v1 (hybrid).
V1 = Path("/sys/fs/cgroup/cpu/cpu.shares").exists()


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def loadavg() -> list[float]:
    return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]


def run(argv: list[str], *, timeout: float = 600, check: bool = True, **kw: Any) -> str:
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, **kw)
    if check and proc.returncode != 0:
        raise RuntimeError(
            f"{shlex.join(argv)[:300]} exited {proc.returncode}: "
            f"{(proc.stderr or proc.stdout).strip()[-2000:]}"
        )
    return proc.stdout


class Host:
    """The systemd container the bundle is deployed to (docker exec)."""

    name = HOST

    def sh(self, script: str, *, timeout: float = 600, check: bool = True) -> str:
        return run(
            ["docker", "exec", self.name, "bash", "-c", f"set -euo pipefail; {script}"],
            timeout=timeout,
            check=check,
        )

    def helper(self, *args: str, timeout: float = 600) -> Any:
        out = self.sh(f"{VENV_PY} {HOST_DIR}/benchhost.py {shlex.join(args)}", timeout=timeout)
        return json.loads(out.strip().splitlines()[-1])

    def systemctl(self, *args: str, timeout: float = 300, check: bool = True) -> str:
        return self.sh("systemctl " + shlex.join(args), timeout=timeout, check=check)

    def exists(self) -> bool:
        return (
            subprocess.run(
                ["docker", "inspect", self.name], capture_output=True, check=False
            ).returncode
            == 0
        )

    def remove(self) -> None:
        if self.exists():
            run(["docker", "rm", "-f", self.name], timeout=120)
        # the parent cgroups docker created for it (empty once the container is gone)
        for ctrl in Path("/sys/fs/cgroup").glob(f"*/{CGROUP_PARENT}"):
            with contextlib.suppress(OSError):
                ctrl.rmdir()

    def create(self) -> None:
        self.remove()
        name = ["--name", self.name, "--hostname", self.name]
        parent_cg = ["--cgroup-parent", f"/{CGROUP_PARENT}"]
        run(
            [
                "docker",
                "run",
                "-d",
                *name,
                *DOCKER_SYSTEMD_FLAGS,
                *parent_cg,
                IMAGE,
                "/lib/systemd/systemd",
            ]
        )
        parent = Path("/sys/fs/cgroup/cpu") / CGROUP_PARENT / "cpu.shares"
        if parent.exists():
            parent.write_text(str(CPU_SHARES))
        for _ in range(120):
            state = run(
                ["docker", "exec", self.name, "systemctl", "is-system-running", "--wait"],
                check=False,
                timeout=150,
            ).strip()
            if state in ("running", "degraded"):
                self.start_sshd()
                return
            time.sleep(1)
        raise RuntimeError(f"systemd in {self.name} did not come up: {state}")

    def start_sshd(self) -> None:
        """sshd on 127.0.0.1:SSH_PORT with a key of the bench's own, no PAM (as the
        Molecule hosts: molecule/shared/prepare.yml); Ansible's inventory uses it."""
        if not SSH_KEY.exists():
            SSH_KEY.parent.mkdir(parents=True, exist_ok=True)
            run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "bench", "-f", str(SSH_KEY)])
        pub = SSH_KEY.with_suffix(".pub").read_text().strip()
        conf = (
            f"ListenAddress 127.0.0.1:{SSH_PORT}\\n"
            "SetEnv LANG=C.UTF-8 PIP_CERT=/etc/ssl/certs/ca-certificates.crt\\n"
            "PermitRootLogin prohibit-password\\nPasswordAuthentication no\\n"
            "KbdInteractiveAuthentication no\\nUsePAM no\\n"
        )
        self.sh(
            f"install -d -m 0700 /root/.ssh && echo {shlex.quote(pub)} > /root/.ssh/authorized_keys"
            f" && printf '{conf}' > /etc/ssh/sshd_config.d/bench.conf"
            " && systemctl restart ssh.service"
        )
        for _ in range(50):
            probe = ["ssh", "-p", str(SSH_PORT), "-i", str(SSH_KEY), "-o", "BatchMode=yes"]
            probe += ["-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null"]
            probe += ["-o", "LogLevel=ERROR", "root@127.0.0.1", "true"]
            if subprocess.run(probe, capture_output=True, check=False, timeout=30).returncode == 0:
                return
            time.sleep(0.2)
        raise RuntimeError(f"sshd in {self.name} does not answer on 127.0.0.1:{SSH_PORT}")

    def install_tools(self) -> None:
        """h2load (the load generator) and the host-side helpers."""
        self.sh(
            "command -v h2load >/dev/null || "
            "{ apt-get update -qq && DEBIAN_FRONTEND=noninteractive "
            "apt-get install -y -qq --no-install-recommends nghttp2-client >/dev/null; }",
            timeout=600,
        )
        self.push_helpers()

    def push_helpers(self) -> None:
        self.sh(f"mkdir -p {HOST_DIR}")
        # the upgrade scenario's open-loop probe counts failed requests during a deploy
        files = [*(BENCH / "hostside").glob("*.py"), ROOT / "molecule/shared/files/probe.py"]
        for f in files:
            run(["docker", "cp", str(f), f"{self.name}:{HOST_DIR}/{f.name}"])
        self.sh(f"chmod -R a+rX {HOST_DIR}")

    def cgroup_path(self, unit: str) -> str:
        """The unit's directory in the cpu controller (cgroup v1), or the unified one (v2)."""
        cg = self.systemctl("show", "-p", "ControlGroup", "--value", unit).strip()
        return f"/sys/fs/cgroup/cpu{cg}" if V1 else f"/sys/fs/cgroup{cg}"

    def cpu_values(self, unit: str) -> dict[str, str]:
        """Effective cgroup values of a unit or slice (v1: cpu.shares, v2: cpu.weight)."""
        path = shlex.quote(self.cgroup_path(unit))
        weight = "cpu.shares" if V1 else "cpu.weight"
        out = self.sh(f"cat {path}/{weight} {path}/cpu.idle")
        value, idle = out.split()
        return {weight: value, "cpu.idle": idle}

    def cgroup_of(self, unit: str) -> str:
        return self.systemctl("show", "-p", "ControlGroup", "--value", unit).strip()

    def journal_since(self, unit: str, since_usec: int) -> list[str]:
        out = self.sh(
            f"journalctl --no-pager -o cat -u {shlex.quote(unit)} --since @{since_usec / 1e6:.6f}",
            check=False,
        )
        return out.splitlines()

    def now_usec(self) -> int:
        return int(self.sh("date +%s%6N").strip())


def cpu_ticks_cmd(cgroup: str) -> str:
    """Shell (run inside the host) printing "CPU <seconds> <epoch>": user + system time of
    the processes in a cgroup tree (/proc/<pid>/stat; systemd does not enable the cgroup
    v1 cpuacct controller for them), with the time it was read. Run it in the same shell
    as the measurement, so the interval is exact."""
    tree = f"/sys/fs/cgroup/systemd{cgroup}" if V1 else f"/sys/fs/cgroup{cgroup}"
    # also the whole machine's busy time (/proc/stat) and the bench host's own (its cgroup's
    # cpuacct, from PID 1's cgroup): what the neighbours got = machine - host
    host_acct = "/sys/fs/cgroup/cpuacct$(sed -n 's/^[0-9]*:cpu[^:]*acct[^:]*://p' /proc/1/cgroup)"
    return (
        f"echo CPU $(cat $(find '{tree}' -name cgroup.procs) | "
        "while read -r p; do cut -d' ' -f14,15 /proc/$p/stat 2>/dev/null; done | "
        "awk -v hz=$(getconf CLK_TCK) '{s += $1 + $2} END {print s / hz}') $(date +%s.%N) "
        "$(awk -v hz=$(getconf CLK_TCK) '/^cpu / {print ($2 + $3 + $4 + $7 + $8 + $9) / hz}' "
        f"/proc/stat) $(awk '{{print $1 / 1e9}}' {host_acct}/cpuacct.usage 2>/dev/null || echo 0)"
    )


def http_status(url: str, timeout: float = 2.0) -> int:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)
    except (OSError, urllib.error.URLError):
        return 0


def wait_status(url: str, want: int = 200, timeout: float = 300, interval: float = 0.05) -> float:
    """Seconds until ``url`` answers ``want`` (raises after ``timeout``)."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if http_status(url, timeout=1.0) == want:
            return time.monotonic() - started
        time.sleep(interval)
    raise TimeoutError(f"{url} did not answer {want} within {timeout} s")


@dataclass
class LoadResult:
    latencies_ms: list[float] = field(default_factory=list)
    sent: int = 0
    ok: int = 0
    failed: int = 0
    generator_lag_ms_p99: float = 0.0
    cpu_cores: float = 0.0
    host_cores: float = 0.0
    neighbour_cores: float = 0.0

    def pct(self, p: float) -> float:
        return percentile(self.latencies_ms, p)

    def summary(self) -> dict[str, Any]:
        return {
            "sent": self.sent,
            "ok": self.ok,
            "failed": self.failed,
            "p50_ms": round(self.pct(50), 3),
            "p90_ms": round(self.pct(90), 3),
            "p99_ms": round(self.pct(99), 3),
            "max_ms": round(max(self.latencies_ms, default=0.0), 3),
            "generator_lag_p99_ms": round(self.generator_lag_ms_p99, 3),
        }


def h2load(
    host: Host, url: str, rate: int, seconds: float, *, weight: int = 10000, cpu_cgroup: str = ""
) -> LoadResult:
    """Open-loop load: h2load creates ``rate`` connections per second on a fixed timer
    (``-r``/``--rate-period``), one request each (``-n`` = ``-c``), whether or not earlier
    answers came back. It runs inside the host in a transient scope with a high CPU weight,
    so the generator itself is not what gets starved. Latency of each request is counted
    from its SCHEDULED start (slot k of the timer), not from when it was sent, so a late
    send counts against the server too (no coordinated omission)."""
    period_ms = 10
    per_period = max(1, round(rate * period_ms / 1000))
    n = int(per_period * seconds * 1000 / period_ms)
    logf = "/tmp/bench-h2load.log"
    cpu = cpu_ticks_cmd(cpu_cgroup) + "; " if cpu_cgroup else ""
    out = host.sh(
        f"rm -f {logf}; {cpu}systemd-run --quiet --scope -p CPUWeight={weight} "
        f"h2load --h1 -n {n} -c {n} -r {per_period} --rate-period {period_ms}ms "
        f"--log-file {logf} {shlex.quote(url)} >/tmp/bench-h2load.out 2>&1 || true; {cpu}",
        timeout=seconds + 180,
    )
    marks = [line.split()[1:5] for line in out.splitlines() if line.startswith("CPU ")]
    raw = host.sh(f"cat {logf} 2>/dev/null || true")
    rows = []
    for line in raw.splitlines():
        parts = line.split("\t")
        if len(parts) >= 3:
            rows.append((int(parts[0]), int(parts[1]), int(parts[2])))
    rows.sort()
    res = LoadResult(sent=n)
    if len(marks) == 2 and all(len(m) == 4 for m in marks):
        (c0, t0_, m0, h0), (c1, t1_, m1, h1) = ([float(x) for x in m] for m in marks)
        span = max(t1_ - t0_, 1e-6)
        res.cpu_cores = (c1 - c0) / span
        res.host_cores = (h1 - h0) / span
        res.neighbour_cores = max(0.0, (m1 - m0) - (h1 - h0)) / span
    if not rows:
        res.failed = n
        return res
    # slot k of the timer starts at t0 + (k // per_period) * period; t0 = the earliest
    # start any request could have had (the smallest start - its slot offset)
    offsets = [r[0] - (k // per_period) * period_ms * 1000 for k, r in enumerate(rows)]
    t0 = min(offsets)
    lags = []
    for k, (start, status, dur) in enumerate(rows):
        scheduled = t0 + (k // per_period) * period_ms * 1000
        lags.append((start - scheduled) / 1000)
        res.latencies_ms.append((start + dur - scheduled) / 1000)
        if 200 <= status < 300:
            res.ok += 1
    res.failed = n - res.ok
    res.generator_lag_ms_p99 = percentile(lags, 99)
    return res


def percentile(values: list[float], p: float) -> float:
    if not values:
        return 0.0
    s = sorted(values)
    k = min(len(s) - 1, max(0, round(p / 100 * len(s) + 0.5) - 1))
    return s[k]


def median(values: list[float]) -> float:
    return statistics.median(values) if values else 0.0


def write_json(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=1, sort_keys=True))
    tmp.replace(path)
