"""Build the offline wheelhouse of one release for one host target, on the controller.

The target names the hosts' interpreter and platform, e.g. cp311-manylinux_2_36_x86_64
(CPython 3.11, glibc 2.36, x86_64). The wheelhouse holds a wheel of every pin of the lock
file for that target plus the app wheel, and a requirements file pinning each with the
sha256 of its file, so a host installs it with `pip install --no-index --find-links
wheelhouse --require-hashes -r wheelhouse/requirements.txt` and needs no package index.

It is cached as CACHE/RELEASE/TARGET/{wheelhouse.tar,requirements.txt}: built once per
release and target (published by a rename, so a crash or a concurrent run never leaves a
half-built entry), then reused. The newest KEEP releases (by last use) stay in the cache.

Prints one JSON object: {"changed": bool, "archive": path, "pins": n}. Errors go to stderr
with exit code 1, naming what the operator has to change.

Usage: wheelhouse.py --cache-dir DIR --release ID --target TAG --wheel WHL --lock FILE [--keep N]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from packaging.markers import Marker
from packaging.requirements import InvalidRequirement, Requirement
from packaging.utils import InvalidWheelFilename, canonicalize_name, parse_wheel_filename

TARGET_RE = re.compile(r"^cp3(\d+)([a-z]*)-manylinux_2_(\d+)_([a-z0-9_]+)$")
# Oldest glibc of a manylinux tag per architecture, and the legacy aliases (PEP 600).
OLDEST_GLIBC_MINOR = {"x86_64": 5, "i686": 5}
LEGACY = {"manylinux2014": 17, "manylinux2010": 12, "manylinux1": 5}
LEGACY_ARCHES = {
    "manylinux2014": {"x86_64", "i686", "aarch64", "armv7l", "ppc64", "ppc64le", "s390x"},
    "manylinux2010": {"x86_64", "i686"},
    "manylinux1": {"x86_64", "i686"},
}


class WheelhouseError(Exception):
    pass


class Target:
    def __init__(self, tag: str) -> None:
        m = TARGET_RE.match(tag)
        if not m:
            raise WheelhouseError(
                f"target {tag!r} is not of the form cp3X-manylinux_2_Y_<arch> (CPython on glibc)"
            )
        minor, self.abiflags, glibc_minor, self.arch = m.groups()
        self.tag = tag
        self.python = f"3.{minor}"
        self.abi = f"cp3{minor}{self.abiflags}"
        self.glibc_minor = int(glibc_minor)

    def describe(self) -> str:
        return (
            f"{self.tag} (CPython {self.python}{self.abiflags}, glibc 2.{self.glibc_minor}, "
            f"{self.arch})"
        )

    def platforms(self) -> list[str]:
        # pip does not widen manylinux_2_Y to older glibc tags: list every one.
        oldest = OLDEST_GLIBC_MINOR.get(self.arch, 17)
        tags = [f"manylinux_2_{m}_{self.arch}" for m in range(self.glibc_minor, oldest - 1, -1)]
        tags += [
            f"{legacy}_{self.arch}"
            for legacy, m in LEGACY.items()
            if self.arch in LEGACY_ARCHES[legacy] and m <= self.glibc_minor
        ]
        return tags

    def environment(self, micro: int) -> dict[str, str]:
        """Marker environment of the hosts (the lock's markers are theirs, not ours)."""
        return {
            "implementation_name": "cpython",
            "platform_python_implementation": "CPython",
            "python_version": self.python,
            "python_full_version": f"{self.python}.{micro}",
            "implementation_version": f"{self.python}.{micro}",
            "sys_platform": "linux",
            "platform_system": "Linux",
            "os_name": "posix",
            "platform_machine": self.arch,
        }


def read_pins(lock: Path, target: Target, app: str) -> list[Requirement]:
    """The lock's exact pins that apply to the target (name==version [; marker])."""
    pins: dict[str, Requirement] = {}
    for number, raw in enumerate(lock.read_text().splitlines(), start=1):
        line = re.sub(r"(^|\s)#.*$", "", raw).strip()
        if not line:
            continue
        where = f"app_requirements_lock {lock} line {number} ({raw.strip()!r})"
        try:
            req = Requirement(line)
        except InvalidRequirement as exc:
            raise WheelhouseError(f"{where}: not a requirement ({exc})") from exc
        specs = list(req.specifier)
        if req.url or len(specs) != 1 or specs[0].operator != "==" or "*" in specs[0].version:
            raise WheelhouseError(
                f"{where}: the wheelhouse needs exact pins, name==version (as pip freeze writes)"
            )
        name = canonicalize_name(req.name)
        if name == app:
            raise WheelhouseError(f"{where}: pins the app itself; the lock lists its dependencies")
        if name in pins:
            raise WheelhouseError(f"{where}: {req.name} is pinned twice")
        # The target does not name the micro version (python_full_version < "3.11.3"):
        # a pin that applies to some 3.X.Y is in; requirements.txt keeps its marker for
        # the host's pip to decide.
        if req.marker is None or any(
            Marker(str(req.marker)).evaluate(target.environment(micro)) for micro in (0, 99)
        ):
            pins[name] = req
    return list(pins.values())


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def download(pins: list[Requirement], target: Target, dest: Path, lock: Path) -> None:
    if not pins:  # pip download refuses an empty requirement list
        return
    argv = [sys.executable, "-m", "pip", "download", "--no-input", "--no-deps"]
    argv += ["--only-binary=:all:"]
    argv += ["--implementation", "cp", "--python-version", target.python, "--abi", target.abi]
    for platform in target.platforms():
        argv += ["--platform", platform]
    argv += ["--progress-bar", "off", "--dest", str(dest)]
    argv += [f"{req.name}=={next(iter(req.specifier)).version}" for req in pins]
    proc = subprocess.run(argv, capture_output=True, text=True, check=False)
    if proc.returncode == 0:
        return
    output = proc.stdout + proc.stderr
    missing = re.findall(r"No matching distribution found for (\S+)", output)
    if missing:
        raise WheelhouseError(
            f"No wheel of {', '.join(missing)} (pinned in app_requirements_lock {lock}) for "
            f"target {target.describe()} on the package index the controller's pip uses. "
            "Pin a version that has a wheel for it, or set app_wheelhouse: false to install "
            "from an index on the hosts (pip may build it there)."
        )
    tail = " | ".join(output.strip().splitlines()[-15:])
    raise WheelhouseError(
        f"pip download of the wheelhouse for target {target.describe()} failed "
        f"(exit {proc.returncode}): {tail}"
    )


def match_files(pins: list[Requirement], wheels: Path) -> dict[str, Path]:
    """One downloaded wheel per pin, of the pinned version."""
    found: dict[str, Path] = {}
    for path in sorted(wheels.iterdir()):
        if path.suffix != ".whl":
            raise WheelhouseError(f"pip download left a file that is not a wheel: {path.name}")
        name = parse_wheel_filename(path.name)[0]
        if name in found:
            raise WheelhouseError(f"two wheels of {name}: {found[name].name}, {path.name}")
        found[name] = path
    for req in pins:
        got = found.get(canonicalize_name(req.name))
        wanted = next(iter(req.specifier))
        if got is None or not wanted.contains(str(parse_wheel_filename(got.name)[1])):
            raise WheelhouseError(f"pip download did not fetch a wheel of {req.name}{wanted}")
    return found


def requirements(pins: list[Requirement], files: dict[str, Path], app: Path, header: str) -> str:
    lines = [f"# {header}"]
    for req in sorted(pins, key=lambda r: canonicalize_name(r.name)):
        path = files[canonicalize_name(req.name)]
        version = next(iter(req.specifier)).version
        marker = f" ; {req.marker}" if req.marker else ""
        lines.append(f"{req.name}=={version}{marker} --hash=sha256:{sha256(path)}")
    name, app_version, _, _ = parse_wheel_filename(app.name)
    lines.append(f"{name}=={app_version} --hash=sha256:{sha256(app)}")
    return "\n".join(lines) + "\n"


def write_archive(wheels: Path, archive: Path) -> None:
    """wheelhouse/ with fixed owners, modes and times: the same content, the same bytes."""

    def entry(name: str, size: int | None) -> tarfile.TarInfo:
        info = tarfile.TarInfo(name)
        info.uid = info.gid = 0
        info.uname = info.gname = "root"
        info.mtime = 0
        if size is None:
            info.type, info.mode = tarfile.DIRTYPE, 0o755
        else:
            info.size, info.mode = size, 0o644
        return info

    with tarfile.open(archive, "w", format=tarfile.PAX_FORMAT) as tar:
        tar.addfile(entry("wheelhouse", None))
        for path in sorted(wheels.iterdir()):
            with path.open("rb") as f:
                tar.addfile(entry(f"wheelhouse/{path.name}", path.stat().st_size), f)


def prune(cache: Path, keep: int, current: Path) -> None:
    # Only release ids: the cache directory may hold other things.
    releases = sorted(
        (
            p
            for p in cache.iterdir()
            if p.is_dir() and p != current and re.fullmatch(r"[0-9a-f]+", p.name)
        ),
        key=lambda p: p.stat().st_mtime,
        reverse=True,
    )
    for old in releases[max(keep - 1, 0) :]:
        shutil.rmtree(old, ignore_errors=True)


def build(args: argparse.Namespace) -> dict[str, object]:
    target = Target(args.target)
    if not re.fullmatch(r"[0-9a-f]+", args.release):
        raise WheelhouseError(f"release id {args.release!r} is not hex")
    wheel, lock = Path(args.wheel), Path(args.lock)
    try:
        app = canonicalize_name(parse_wheel_filename(wheel.name)[0])
    except InvalidWheelFilename as exc:
        raise WheelhouseError(f"app wheel {wheel}: {exc}") from exc
    cache = Path(args.cache_dir).expanduser()
    release = cache / args.release
    entry = release / target.tag
    archive = entry / "wheelhouse.tar"
    release.mkdir(parents=True, exist_ok=True)
    pins = read_pins(lock, target, app)
    changed = False
    if not archive.is_file():
        # An entry without its archive was not published by this script: rebuild it.
        shutil.rmtree(entry, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".build-{target.tag}-", dir=release))
        try:
            wheels = tmp / "wheelhouse"
            wheels.mkdir()
            download(pins, target, wheels, lock)
            files = match_files(pins, wheels)
            shutil.copyfile(wheel, wheels / wheel.name)
            header = (
                f"release {args.release}, target {target.tag}: every pin of {lock.name} and "
                f"the app wheel, each with the sha256 of its file in this directory"
            )
            text = requirements(pins, files, wheels / wheel.name, header)
            (wheels / "requirements.txt").write_text(text)
            write_archive(wheels, tmp / "wheelhouse.tar")
            shutil.rmtree(wheels)
            (tmp / "requirements.txt").write_text(text)
            try:
                tmp.rename(entry)
                changed = True
            except OSError:
                if not archive.is_file():  # not another run that just published it
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    os.utime(release)  # last use: what prune keeps
    prune(cache, args.keep, release)
    return {"changed": changed, "archive": str(archive), "pins": len(pins) + 1}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache-dir", required=True)
    parser.add_argument("--release", required=True)
    parser.add_argument("--target", required=True)
    parser.add_argument("--wheel", required=True)
    parser.add_argument("--lock", required=True)
    parser.add_argument("--keep", type=int, default=3)
    args = parser.parse_args()
    try:
        result = build(args)
    except (WheelhouseError, OSError) as exc:
        print(exc, file=sys.stderr)
        return 1
    json.dump(result, sys.stdout)
    print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
