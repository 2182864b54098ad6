"""Model files: download (resumable, verified, atomic) and presence checks.

Content-addressed: in ``models_dir`` a model named ``NAME`` with sha256 ``H`` lives at
``NAME@H32`` (``H32``: the first 32 hex digits of ``H``), so the file a live release reads is
never the file a new release downloads. A model changed under the same name goes to a new
path while the old one keeps serving; a failed download of the new one leaves the old one
untouched. Layout:
- ``NAME@H32``            the verified file (only ever created by an atomic rename)
- ``.NAME@H32.part``      an incomplete download, resumed with an HTTP Range request
- ``.NAME@H32.verified``  stamp: ``sha256 size mtime_ns`` of the verified file, so a boot does
                          not re-hash large files and /readyz can check cheaply
- ``.lock``               flock held by the bootstrap that downloads (one per host at a time)
- ``.live.json``          written by the deploy before a release phase: the models the live
                          release uses (``XAGENT_MODELS`` JSON); never removed by pruning

Old versions: after a download, each configured name keeps the wanted version, the live
release's (``.live.json``) and the one verified most recently besides those (the rollback
target, or the live one when the deploy wrote no list); older versions and other versions'
partial files are removed. When ``.live.json`` cannot be read, nothing is removed. Names
no longer configured are left alone (a live release may still read them); remove them by
hand. Files of the layout before content addressing (``NAME`` + ``.NAME.verified``) are
adopted by a hard link when their stamp matches, and count as a version of ``NAME``.

A download is resumed (HTTP Range) as long as bytes keep arriving: it fails only when no byte
arrived for ``stall_seconds`` across attempts, or at once on a permanent error (HTTP 4xx
other than 408/429, a sha256 mismatch of the complete file). There is no limit on the total
time or the number of attempts: a slow but steady link finishes.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import mmap
import os
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import httpx
from pydantic import TypeAdapter, ValidationError

from xagent.settings import ModelFile, ModelSpec, Settings, redact_url

CHUNK = 1024 * 1024
Printer = Callable[[str], None]


class ModelError(Exception):
    """A model could not be downloaded or verified (one-line message)."""


@dataclass(frozen=True)
class Paths:
    final: Path
    part: Path
    stamp: Path


def file_name(spec: ModelFile) -> str:
    """``NAME@H32``: the model's file name in ``models_dir`` (also what apps open)."""
    return f"{spec.name}@{spec.sha256[:32]}"


def _paths(final: Path) -> Paths:
    """The verified file ``final`` with its partial download and its stamp beside it."""
    return Paths(
        final=final,
        part=final.with_name(f".{final.name}.part"),
        stamp=final.with_name(f".{final.name}.verified"),
    )


def paths_for(models_dir: Path, spec: ModelFile) -> Paths:
    return _paths(models_dir / file_name(spec))


def _legacy_paths(models_dir: Path, spec: ModelSpec) -> Paths:
    """Where the layout before content addressing kept ``NAME``."""
    return _paths(models_dir / spec.name)


def _stamp_text(sha256: str, st: os.stat_result) -> str:
    return f"{sha256} {st.st_size} {st.st_mtime_ns}\n"


def stamp_ok(paths: Paths, sha256: str) -> bool:
    """True when the final file exists and the stamp says it was verified as ``sha256``."""
    try:
        st = paths.final.stat()
        stamp = paths.stamp.read_text(encoding="ascii")
    except (FileNotFoundError, NotADirectoryError, UnicodeDecodeError):
        return False
    return stamp == _stamp_text(sha256, st)


def _write_stamp(paths: Paths, sha256: str) -> None:
    st = paths.final.stat()
    tmp = paths.stamp.with_name(paths.stamp.name + ".tmp")
    tmp.write_text(_stamp_text(sha256, st), encoding="ascii")
    os.replace(tmp, paths.stamp)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def check_all(settings: Settings) -> list[str]:
    """Problems with the configured models (empty list: all present and verified)."""
    problems = []
    for spec in settings.models:
        if not stamp_ok(paths_for(settings.models_dir, spec), spec.sha256):
            problems.append(f"{spec.name} missing or not verified")
    return problems


def map_all(settings: Settings) -> list[mmap.mmap]:
    """Map every present model file read-only, shared: all web workers and receivers that
    map it use the one copy in the page cache instead of one each on their heap. The pages
    are faulted in now (MAP_POPULATE), as loading the model's weights would. A missing
    file is skipped (/readyz reports it)."""
    maps = []
    flags = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)
    for spec in settings.models:
        try:
            with paths_for(settings.models_dir, spec).final.open("rb") as fh:
                if os.fstat(fh.fileno()).st_size > 0:
                    maps.append(mmap.mmap(fh.fileno(), 0, flags=flags, prot=mmap.PROT_READ))
        except (FileNotFoundError, NotADirectoryError):
            continue
    return maps


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class _Progress:
    """Prints a progress line at most every ``interval`` seconds (and at the end)."""

    def __init__(self, name: str, interval: float, out: Printer) -> None:
        self.name = name
        self.interval = interval
        self.out = out
        self.started = time.monotonic()
        self.last = self.started
        self.bytes_this_run = 0
        # The stall clock: when the file last grew beyond anything received before. Bytes
        # that a server re-sends after ignoring Range (200 from offset 0) are no progress.
        self.high_water = 0
        self.last_progress = self.started

    def update(self, done: int, total: int | None, added: int, *, final: bool = False) -> None:
        self.bytes_this_run += added
        now = time.monotonic()
        if done > self.high_water:
            self.high_water = done
            self.last_progress = now
        if not final and now - self.last < self.interval:
            return
        self.last = now
        speed = self.bytes_this_run / max(now - self.started, 1e-6) / 1e6
        mb = done / 1e6
        if total:
            self.out(
                f"model {self.name}: {100 * done / total:5.1f}% "
                f"{mb:.1f}/{total / 1e6:.1f} MB {speed:.2f} MB/s"
            )
        else:
            self.out(f"model {self.name}: {mb:.1f} MB {speed:.2f} MB/s")


class _TransferBroken(Exception):
    """A transient failure (broken connection, timeout, 5xx/408/429); the part file keeps
    what arrived and the caller retries while bytes keep arriving."""


# Client errors that a retry cannot fix; 408 (request timeout) and 429 (too many requests)
# are the server asking to try again later.
_TRANSIENT_4XX = {408, 429}


def _open_part(part: Path, offset: int) -> IO[bytes]:
    fh = part.open("r+b" if offset else "wb")
    fh.seek(offset)
    fh.truncate()
    return fh


def _hash_prefix(part: Path, size: int) -> hashlib._Hash:
    digest = hashlib.sha256()
    with part.open("rb") as fh:
        remaining = size
        while remaining > 0 and (chunk := fh.read(min(CHUNK, remaining))):
            digest.update(chunk)
            remaining -= len(chunk)
    return digest


def _fetch_http(
    spec: ModelSpec, part: Path, offset: int, progress: _Progress, timeout: float
) -> str:
    """Download into ``part`` starting at ``offset``; returns the hex digest of the whole file."""
    # identity encoding: Range offsets and the digest apply to the file's own bytes
    headers = {"Accept-Encoding": "identity"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    try:
        with (
            httpx.Client(timeout=timeout, follow_redirects=True) as client,
            client.stream("GET", spec.url, headers=headers) as resp,
        ):
            if offset and resp.status_code == 416:
                # the part may already be complete: the caller verifies it
                return _hash_prefix(part, offset).hexdigest()
            status = resp.status_code
            if status == 200:
                offset = 0  # no Range sent, or the server ignored it: start over
            elif status == 206 and offset:
                content_range = resp.headers.get("content-range", "")
                if not content_range.startswith(f"bytes {offset}-"):
                    raise _TransferBroken(f"unexpected Content-Range {content_range!r}")
            elif status >= 500 or status in _TRANSIENT_4XX:
                raise _TransferBroken(f"HTTP {status}")
            else:
                raise ModelError(f"{spec.name}: HTTP {status} from {redact_url(spec.url)}")
            digest = _hash_prefix(part, offset) if offset else hashlib.sha256()
            length = resp.headers.get("content-length")
            total = offset + int(length) if length is not None else None
            done = offset
            with _open_part(part, offset) as fh:
                try:
                    for chunk in resp.iter_raw():  # as it arrives: nothing lost on a break
                        fh.write(chunk)
                        digest.update(chunk)
                        done += len(chunk)
                        progress.update(done, total, len(chunk))
                finally:
                    fh.flush()
                    os.fsync(fh.fileno())
            if total is not None and done != total:
                raise _TransferBroken(f"got {done} of {total} bytes")
            progress.update(done, total, 0, final=True)
            return digest.hexdigest()
    except (httpx.TransportError, httpx.StreamError) as exc:
        # an httpx message may quote the request URL; its token must not reach the journal
        detail = str(exc).replace(spec.url, redact_url(spec.url))
        raise _TransferBroken(f"{type(exc).__name__}: {detail}") from exc


def _fetch_file(spec: ModelSpec, part: Path, offset: int, progress: _Progress) -> str:
    source = Path(urllib.request.url2pathname(urllib.parse.urlparse(spec.url).path))
    try:
        src = source.open("rb")
    except OSError as exc:
        raise ModelError(f"{spec.name}: cannot open {source}: {exc.strerror}") from None
    with src:
        total = os.fstat(src.fileno()).st_size
        if offset > total:
            offset = 0
        digest = _hash_prefix(part, offset) if offset else hashlib.sha256()
        src.seek(offset)
        done = offset
        with _open_part(part, offset) as fh:
            while chunk := src.read(CHUNK):
                fh.write(chunk)
                digest.update(chunk)
                done += len(chunk)
                progress.update(done, total, len(chunk))
            fh.flush()
            os.fsync(fh.fileno())
    progress.update(done, total, 0, final=True)
    return digest.hexdigest()


@contextlib.contextmanager
def _dir_lock(models_dir: Path, out: Printer) -> Iterator[None]:
    """Two bootstraps on one host (the boot unit and a release's unit) must not write the
    same part file: the second waits, then finds the models verified."""
    with (models_dir / ".lock").open("a") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            out(f"models: waiting for {models_dir / '.lock'} (another bootstrap on this host)")
            fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def ensure_model(
    spec: ModelSpec,
    models_dir: Path,
    *,
    out: Printer = print,
    progress_interval: float = 2.0,
    stall_seconds: float = 120.0,
    timeout: float = 30.0,
) -> str:
    """Make ``models_dir/NAME`` present and verified. Returns "present" or "downloaded".

    ``timeout`` bounds one network wait (connect, or the gap between two reads); a stalled
    connection is then dropped and resumed, until no byte arrived for ``stall_seconds``.
    """
    paths = paths_for(models_dir, spec)
    if stamp_ok(paths, spec.sha256):
        return "present"
    legacy = _legacy_paths(models_dir, spec)
    if not paths.final.exists() and stamp_ok(legacy, spec.sha256):
        # a file of the old layout with this content: a second name for it, no download
        os.link(legacy.final, paths.final)
        _fsync_dir(models_dir)
        _write_stamp(paths, spec.sha256)
        out(f"model {spec.name}: present (adopted {legacy.final.name})")
        return "present"
    if paths.final.exists():
        # no (matching) stamp: hash once; a mismatch means the file is damaged
        if sha256_file(paths.final) == spec.sha256:
            _write_stamp(paths, spec.sha256)
            out(f"model {spec.name}: present, verified")
            return "present"
        out(f"model {spec.name}: existing {paths.final.name} does not match sha256, replacing it")
        # nothing else reads this path: its name says which content it must have
        paths.final.unlink()
    paths.stamp.unlink(missing_ok=True)

    progress = _Progress(spec.name, progress_interval, out)
    progress.high_water = paths.part.stat().st_size if paths.part.exists() else 0
    idle_attempts = 0  # consecutive attempts that brought no new byte
    while True:
        offset = paths.part.stat().st_size if paths.part.exists() else 0
        if offset:
            out(f"model {spec.name}: resuming at {offset} bytes")
        else:
            out(f"model {spec.name}: downloading {redact_url(spec.url)}")
        high_water_before = progress.high_water
        try:
            if spec.url.startswith("file://"):
                digest = _fetch_file(spec, paths.part, offset, progress)
            else:
                # never wait on one read longer than the stall budget that is left
                left = stall_seconds - (time.monotonic() - progress.last_progress)
                wait = max(0.5, min(timeout, left))
                digest = _fetch_http(spec, paths.part, offset, progress, wait)
            break
        except OSError as exc:
            # the models' filesystem is full or read-only: waiting does not help
            raise ModelError(
                f"{spec.name}: cannot write {paths.part.name} in {models_dir}: {exc.strerror} "
                f"(partial file kept for the next run)"
            ) from None
        except _TransferBroken as exc:
            stalled = time.monotonic() - progress.last_progress
            if stalled >= stall_seconds:
                raise ModelError(
                    f"{spec.name}: no new data for {stalled:.0f} s (stall limit "
                    f"XAGENT_DOWNLOAD_STALL_SECONDS={stall_seconds:g}), last: {exc} "
                    f"(partial file kept for the next run)"
                ) from None
            if progress.high_water > high_water_before:
                idle_attempts = 0
                delay = 0.1  # it was moving: reconnect right away
            else:
                idle_attempts += 1
                delay = min(0.5 * 2 ** (idle_attempts - 1), 10.0)
            delay = min(delay, stall_seconds - stalled)
            out(
                f"model {spec.name}: transfer broken ({exc}); retrying in {delay:.1f} s "
                f"(no new data for {stalled:.0f} of {stall_seconds:g} s)"
            )
            time.sleep(delay)

    if digest != spec.sha256:
        paths.part.unlink(missing_ok=True)
        raise ModelError(f"{spec.name}: sha256 mismatch (expected {spec.sha256}, got {digest})")
    os.replace(paths.part, paths.final)
    _fsync_dir(models_dir)
    _write_stamp(paths, spec.sha256)
    out(f"model {spec.name}: downloaded and verified")
    return "downloaded"


def _versions(models_dir: Path, name: str) -> list[Paths]:
    """Every verified-or-not version of ``name`` on disk (new and old layout), not partials."""
    # names have no glob characters (settings)
    found = [_paths(path) for path in models_dir.glob(f"{name}@*")]
    legacy = models_dir / name
    if legacy.is_file():
        found.append(_paths(legacy))
    return found


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except FileNotFoundError:
        return 0.0


LIVE_FILE = ".live.json"


def live_specs(models_dir: Path) -> list[ModelFile] | None:
    """The models the live release uses, as the deploy listed them in ``.live.json`` ([] when
    there is no list: name and sha256 of each, no URL, which may carry a token); None when
    the list exists but cannot be read."""
    try:
        raw = (models_dir / LIVE_FILE).read_bytes()
    except FileNotFoundError:
        return []
    except OSError:
        return None
    try:
        return TypeAdapter(list[ModelFile]).validate_json(raw)
    except ValidationError:
        return None


def prune(
    models_dir: Path,
    specs: list[ModelSpec],
    *,
    live: Sequence[ModelFile] = (),
    out: Printer = print,
) -> list[str]:
    """Per configured name keep the wanted version, the versions of ``live`` and the one
    verified most recently besides those; remove older versions and partial downloads of
    other versions. Returns the removed file names."""
    removed: list[str] = []
    for spec in specs:
        wanted = paths_for(models_dir, spec)
        keep = {wanted.final} | {
            paths_for(models_dir, other).final for other in live if other.name == spec.name
        }
        others = [v for v in _versions(models_dir, spec.name) if v.final not in keep]
        others.sort(key=lambda v: _mtime(v.stamp), reverse=True)
        for version in others[1:]:
            for path in (version.final, version.stamp):
                if path.exists():
                    path.unlink()
                    removed.append(path.name)
        for part in models_dir.glob(f".{spec.name}@*.part"):
            if part != wanted.part:
                part.unlink()
                removed.append(part.name)
    if removed:
        out(f"models: removed old versions {', '.join(sorted(removed))}")
    return removed


def ensure_all(settings: Settings, *, out: Printer = print) -> dict[str, str]:
    """Download/verify every configured model (host-local step), then remove versions
    older than the one before the wanted one."""
    try:
        settings.models_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ModelError(f"{settings.models_dir}: cannot create ({exc.strerror})") from None
    results = {}
    with _dir_lock(settings.models_dir, out):
        for spec in settings.models:
            results[spec.name] = ensure_model(
                spec,
                settings.models_dir,
                out=out,
                progress_interval=settings.download_progress_seconds,
                stall_seconds=settings.download_stall_seconds,
            )
        live = live_specs(settings.models_dir)
        if live is None:
            out(f"models: {settings.models_dir / LIVE_FILE} cannot be read; no old version removed")
        else:
            prune(settings.models_dir, list(settings.models), live=live, out=out)
    return results
