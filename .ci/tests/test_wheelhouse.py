"""roles/release/files/wheelhouse.py against the real PyPI, with a one-pin lock (six).

Each test runs the script as the release role does (the controller's Python, its pip and
pip's configuration) and installs the result the way a host does: a new venv,
`pip install --no-index --require-hashes`, with the index pointed at a closed port so
nothing can come from elsewhere.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "roles/release/files/wheelhouse.py"
PIN = "six==1.16.0"
# Where no index answers: a pip that tries to reach one fails at once.
NO_INDEX = {"PIP_INDEX_URL": "http://127.0.0.1:9/simple", "PIP_FIND_LINKS": "", "PIP_RETRIES": "0"}


def local_target() -> str:
    """This machine's target, as the role computes it on a host."""
    libc, version = platform.libc_ver()
    assert libc == "glibc"
    v = sys.version_info
    glibc = version.replace(".", "_")
    return f"cp{v.major}{v.minor}{sys.abiflags}-manylinux_{glibc}_{platform.machine()}"


def make_app_wheel(directory: Path) -> Path:
    """A minimal, valid wheel of an app `tinyapp` that imports six."""
    path = directory / "tinyapp-0.1.0-py3-none-any.whl"
    files = {
        "tinyapp.py": "import six\n\nANSWER = 42\n",
        "tinyapp-0.1.0.dist-info/METADATA": (
            "Metadata-Version: 2.1\nName: tinyapp\nVersion: 0.1.0\nRequires-Dist: six\n"
        ),
        "tinyapp-0.1.0.dist-info/WHEEL": (
            "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
        ),
    }
    record = [f"{name},," for name in files] + ["tinyapp-0.1.0.dist-info/RECORD,,"]
    files["tinyapp-0.1.0.dist-info/RECORD"] = "\n".join(record) + "\n"
    with zipfile.ZipFile(path, "w") as whl:
        for name, text in files.items():
            whl.writestr(zipfile.ZipInfo(name, (1980, 1, 1, 0, 0, 0)), text)
    return path


def run(
    tmp: Path,
    lock_text: str,
    *,
    target: str | None = None,
    release: str = "a1",
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    lock = tmp / "requirements.lock"
    lock.write_text(lock_text)
    wheel = tmp / "tinyapp-0.1.0-py3-none-any.whl"
    if not wheel.exists():
        make_app_wheel(tmp)
    argv = [sys.executable, str(SCRIPT), "--cache-dir", str(tmp / "cache"), "--release", release]
    argv += ["--target", target or local_target(), "--wheel", str(wheel), "--lock", str(lock)]
    argv += ["--keep", "2"]
    return subprocess.run(
        argv, capture_output=True, text=True, env={**os.environ, **(env or {})}, timeout=300
    )


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_wheelhouse_installs_offline_with_hashes(tmp_path: Path) -> None:
    # The pywin32 pin does not apply to Linux hosts: left out, not an error. The target
    # does not name the micro version: async-timeout may apply to some 3.X.Y, so it is in
    # with its marker, and this interpreter's pip (the "host") skips it.
    here = platform.python_version()
    lock = f"# a comment\n{PIN}\npywin32==306 ; sys_platform == 'win32'\n"
    lock += f'async-timeout==5.0.1 ; python_full_version != "{here}"\n'
    proc = run(tmp_path, lock)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["changed"] is True
    assert result["pins"] == 3
    archive = Path(result["archive"])
    assert archive == tmp_path / "cache" / "a1" / local_target() / "wheelhouse.tar"

    with tarfile.open(archive) as tar:
        members = {m.name: m for m in tar.getmembers()}
        files = {n: f.read() for n, m in members.items() if (f := tar.extractfile(m))}
    wheels = {n: data for n, data in files.items() if n.endswith(".whl")}
    text = files["wheelhouse/requirements.txt"].decode()
    assert sorted(wheels) == [
        "wheelhouse/async_timeout-5.0.1-py3-none-any.whl",
        "wheelhouse/six-1.16.0-py2.py3-none-any.whl",
        "wheelhouse/tinyapp-0.1.0-py3-none-any.whl",
    ]
    assert all(m.uid == 0 and m.mtime == 0 for m in members.values())
    # Every file is pinned with the sha256 of its bytes; the copy beside the archive is the same.
    lines = [line for line in text.splitlines() if not line.startswith("#")]
    timeout = sha256(wheels["wheelhouse/async_timeout-5.0.1-py3-none-any.whl"])
    six = sha256(wheels["wheelhouse/six-1.16.0-py2.py3-none-any.whl"])
    app = sha256(wheels["wheelhouse/tinyapp-0.1.0-py3-none-any.whl"])
    assert lines == [
        f'async-timeout==5.0.1 ; python_full_version != "{here}" --hash=sha256:{timeout}',
        f"six==1.16.0 --hash=sha256:{six}",
        f"tinyapp==0.1.0 --hash=sha256:{app}",
    ]
    assert (archive.parent / "requirements.txt").read_text() == text

    # As a host does it: unpack, new venv, no index reachable.
    subprocess.run(["tar", "-xf", str(archive), "-C", str(tmp_path)], check=True)
    subprocess.run([sys.executable, "-m", "venv", str(tmp_path / "venv")], check=True)
    pip = [str(tmp_path / "venv/bin/pip"), "install", "--no-index", "--require-hashes"]
    pip += ["--find-links", str(tmp_path / "wheelhouse")]
    pip += ["-r", str(tmp_path / "wheelhouse/requirements.txt")]
    install = subprocess.run(
        pip, capture_output=True, text=True, env={**os.environ, **NO_INDEX}, timeout=300
    )
    assert install.returncode == 0, install.stderr
    check = [str(tmp_path / "venv/bin/python"), "-c", "import tinyapp; print(tinyapp.ANSWER)"]
    assert subprocess.run(check, capture_output=True, text=True).stdout == "42\n"
    assert "Ignoring async-timeout" in install.stdout

    # A changed file no longer matches its pin: pip refuses it.
    (tmp_path / "wheelhouse/six-1.16.0-py2.py3-none-any.whl").write_bytes(b"tampered")
    subprocess.run([sys.executable, "-m", "venv", str(tmp_path / "venv2")], check=True)
    pip[0] = str(tmp_path / "venv2/bin/pip")
    tampered = subprocess.run(
        pip, capture_output=True, text=True, env={**os.environ, **NO_INDEX}, timeout=300
    )
    assert tampered.returncode != 0
    assert "DO NOT MATCH THE HASHES" in tampered.stderr


def test_second_run_reuses_the_cache_without_an_index(tmp_path: Path) -> None:
    first = run(tmp_path, f"{PIN}\n")
    assert first.returncode == 0, first.stderr
    archive = Path(json.loads(first.stdout)["archive"])
    before = (archive.read_bytes(), archive.stat().st_mtime_ns)

    # No index reachable: only a cache hit can succeed.
    second = run(tmp_path, f"{PIN}\n", env=NO_INDEX)
    assert second.returncode == 0, second.stderr
    assert json.loads(second.stdout) == {**json.loads(first.stdout), "changed": False}
    assert (archive.read_bytes(), archive.stat().st_mtime_ns) == before


def test_a_rebuild_gives_the_same_bytes(tmp_path: Path) -> None:
    # As after the cache was cleared: the same release and target, the same archive.
    one = run(tmp_path, f"{PIN}\n")
    assert one.returncode == 0, one.stderr
    archive = Path(json.loads(one.stdout)["archive"])
    before = archive.read_bytes()
    shutil.rmtree(tmp_path / "cache")
    two = run(tmp_path, f"{PIN}\n")
    assert two.returncode == 0, two.stderr
    assert json.loads(two.stdout)["changed"] is True
    assert archive.read_bytes() == before


def test_old_releases_are_pruned(tmp_path: Path) -> None:
    # --keep 2: the current release and the one used last before it stay.
    for release in ("a1", "b2", "c3"):
        proc = run(tmp_path, f"{PIN}\n", release=release)
        assert proc.returncode == 0, proc.stderr
    (tmp_path / "cache" / "notes").mkdir()  # not a release id: never touched
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == ["b2", "c3", "notes"]


def test_a_pin_without_a_wheel_for_the_target_names_the_variable(tmp_path: Path) -> None:
    # MarkupSafe 3.0.3 has wheels for glibc 2.17 and newer only: none for a glibc 2.5 host.
    proc = run(tmp_path, "MarkupSafe==3.0.3\n", target="cp311-manylinux_2_5_x86_64")
    assert proc.returncode == 1
    assert "No wheel of MarkupSafe==3.0.3" in proc.stderr
    assert "cp311-manylinux_2_5_x86_64 (CPython 3.11, glibc 2.5, x86_64)" in proc.stderr
    assert "set app_wheelhouse: false" in proc.stderr
    assert not (tmp_path / "cache" / "a1" / "cp311-manylinux_2_5_x86_64").exists()


@pytest.mark.parametrize(
    ("lock", "message"),
    [
        ("six>=1.16\n", "needs exact pins"),
        ("six==1.16.0\nsix==1.16.0\n", "pinned twice"),
        ("tinyapp==0.1.0\n", "pins the app itself"),
        ("-e .\n", "not a requirement"),
    ],
)
def test_a_lock_the_wheelhouse_cannot_pin_is_refused(
    tmp_path: Path, lock: str, message: str
) -> None:
    proc = run(tmp_path, lock, env=NO_INDEX)
    assert proc.returncode == 1
    assert message in proc.stderr
    assert "app_requirements_lock" in proc.stderr


def test_a_target_that_is_not_cpython_on_glibc_is_refused(tmp_path: Path) -> None:
    proc = run(tmp_path, f"{PIN}\n", target="pp310-musllinux_1_2_x86_64", env=NO_INDEX)
    assert proc.returncode == 1
    assert "is not of the form cp3X-manylinux_2_Y_<arch>" in proc.stderr
