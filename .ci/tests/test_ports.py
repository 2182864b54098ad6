"""Every fixed port of the test hosts, the demo and the bench is below the kernel's
ephemeral range (docs/contract.md): on the shared loopback a port inside it can be the
source port of a long-lived client connection, and a server then cannot bind it."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
RANGE = Path("/proc/sys/net/ipv4/ip_local_port_range")
# YAML keys ending in _port (or _PORT: environment variables) with a literal number,
# quoted or not, or as the default of Molecule's ${NAME:-default}; the bench's *_PORT
YAML_PORT = re.compile(r"^\s*(\w*_(?:port|PORT)):\s*\"?(?:\$\{\w+:-)?(\d+)\}?\"?\s*$", re.M)
PY_PORT = re.compile(r"^(\w*_PORT)\s*=\s*(\d+)\s*$", re.M)


def ephemeral_low() -> int:
    return int(RANGE.read_text().split()[0]) if RANGE.exists() else 32768


def fixed_ports() -> list[tuple[str, str, int]]:
    files = subprocess.run(
        ["git", "-C", str(ROOT), "ls-files", ".config", "molecule", "inventory", "bench"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    found = []
    for name in files:
        if not name.endswith((".yml", ".yaml", ".py")):
            continue
        pattern = PY_PORT if name.endswith(".py") else YAML_PORT
        for m in pattern.finditer((ROOT / name).read_text()):
            found.append((name, m.group(1), int(m.group(2))))
    return found


def test_ports_are_found() -> None:
    names = {key for _, key, _ in fixed_ports()}
    assert {"web_port", "redis_port", "postgresql_port", "BARE_PORT", "XAGENT_VM_SSH_PORT"} <= names


def test_no_fixed_port_in_the_ephemeral_range() -> None:
    low = ephemeral_low()
    inside = [f"{f}: {key} {port}" for f, key, port in fixed_ports() if port >= low]
    assert not inside, f"ports at or above {low} (the ephemeral range): {inside}"
