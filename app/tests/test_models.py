"""Model downloads: verify, skip when verified, resume after a dropped connection, refuse a
wrong checksum, file:// sources, progress lines; a stall limit instead of a retry count or a
total time limit."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from fileserver import FileServer
from xagent import models
from xagent.settings import ModelSpec, Settings, load_settings

SIZE = 3 * 1024 * 1024 + 123


@pytest.fixture
def payload() -> bytes:
    return os.urandom(SIZE)


@pytest.fixture
def server(payload: bytes) -> Iterator[FileServer]:
    srv = FileServer(files={"m.bin": payload}).start()
    yield srv
    srv.stop()


def _spec(url: str, data: bytes, name: str = "m.bin") -> ModelSpec:
    return ModelSpec(name=name, url=url, sha256=hashlib.sha256(data).hexdigest())


def _leftovers(models_dir: Path) -> list[str]:
    return sorted(p.name for p in models_dir.iterdir() if p.name != ".lock")


def test_download_verifies_and_then_skips(
    server: FileServer, payload: bytes, tmp_path: Path
) -> None:
    spec = _spec(server.url("m.bin"), payload)
    lines: list[str] = []
    assert models.ensure_model(spec, tmp_path, out=lines.append) == "downloaded"
    assert models.paths_for(tmp_path, spec).final.read_bytes() == payload
    assert models.stamp_ok(models.paths_for(tmp_path, spec), spec.sha256)
    name = f"m.bin@{spec.sha256[:32]}"
    assert _leftovers(tmp_path) == [f".{name}.verified", name]
    assert len(server.requests) == 1

    assert models.ensure_model(spec, tmp_path, out=lines.append) == "present"
    assert len(server.requests) == 1  # no second download, no re-hash needed


def test_download_resumes_after_dropped_connection(
    server: FileServer, payload: bytes, tmp_path: Path
) -> None:
    cut = 1024 * 1024 + 17
    server.drop_first_after["m.bin"] = cut
    spec = _spec(server.url("m.bin"), payload)
    lines: list[str] = []
    assert models.ensure_model(spec, tmp_path, out=lines.append) == "downloaded"
    assert models.paths_for(tmp_path, spec).final.read_bytes() == payload
    assert [r.range for r in server.requests] == [None, f"bytes={cut}-"]
    assert any("transfer broken" in line for line in lines), lines
    assert any(f"resuming at {cut} bytes" in line for line in lines), lines


def test_partial_file_from_an_earlier_run_is_resumed(
    server: FileServer, payload: bytes, tmp_path: Path
) -> None:
    spec = _spec(server.url("m.bin"), payload)
    models.paths_for(tmp_path, spec).part.write_bytes(payload[:500_000])
    assert models.ensure_model(spec, tmp_path, out=lambda _: None) == "downloaded"
    assert [r.range for r in server.requests] == ["bytes=500000-"]
    assert models.paths_for(tmp_path, spec).final.read_bytes() == payload


def test_wrong_sha256_fails_and_leaves_nothing(
    server: FileServer, payload: bytes, tmp_path: Path
) -> None:
    spec = ModelSpec(name="m.bin", url=server.url("m.bin"), sha256="0" * 64)
    got = hashlib.sha256(payload).hexdigest()
    # the Ansible side greps this format (model name first)
    expected = f"m.bin: sha256 mismatch (expected {'0' * 64}, got {got})"
    with pytest.raises(models.ModelError, match=re.escape(expected)):
        models.ensure_model(spec, tmp_path, out=lambda _: None)
    assert _leftovers(tmp_path) == []
    assert len(server.requests) == 1  # permanent: no retry


def test_damaged_file_with_wrong_content_is_replaced(
    server: FileServer, payload: bytes, tmp_path: Path
) -> None:
    spec = _spec(server.url("m.bin"), payload)
    models.paths_for(tmp_path, spec).final.write_bytes(b"damaged model")
    assert models.ensure_model(spec, tmp_path, out=lambda _: None) == "downloaded"
    assert models.paths_for(tmp_path, spec).final.read_bytes() == payload


def test_existing_verified_file_without_stamp_is_hashed_once(
    payload: bytes, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    hashed: list[Path] = []
    real_sha256_file = models.sha256_file

    def counting_sha256_file(path: Path) -> str:
        hashed.append(path)
        return real_sha256_file(path)

    monkeypatch.setattr(models, "sha256_file", counting_sha256_file)
    spec = _spec("http://127.0.0.1:9/never-used", payload)
    paths = models.paths_for(tmp_path, spec)
    paths.final.write_bytes(payload)
    assert models.ensure_model(spec, tmp_path, out=lambda _: None) == "present"
    assert hashed == [paths.final]
    assert paths.stamp.exists()
    # the second run (the next boot) trusts the stamp: no re-hash of a large file
    assert models.ensure_model(spec, tmp_path, out=lambda _: None) == "present"
    assert hashed == [paths.final]


def test_http_error_is_reported(server: FileServer, tmp_path: Path) -> None:
    spec = ModelSpec(name="x", url=server.url("missing"), sha256="1" * 64)
    with pytest.raises(models.ModelError, match="HTTP 404"):
        models.ensure_model(spec, tmp_path, out=lambda _: None)
    assert len(server.requests) == 1  # permanent: no retry


def test_client_error_is_permanent(server: FileServer, payload: bytes, tmp_path: Path) -> None:
    server.fail_next["m.bin"] = [403]
    spec = _spec(server.url("m.bin"), payload)
    with pytest.raises(models.ModelError, match=r"^m\.bin: HTTP 403 from "):
        models.ensure_model(spec, tmp_path, out=lambda _: None, stall_seconds=60)
    assert [r.status for r in server.requests] == [403]


def test_url_credentials_and_tokens_never_reach_logs_or_errors(
    server: FileServer, payload: bytes, tmp_path: Path
) -> None:
    # a model behind a signed URL or basic auth: the token and the password are secrets
    host = server.base_url.removeprefix("http://")
    url = f"http://bob:pw-s3cret@{host}/m.bin?X-Amz-Signature=tok-s3cret&expires=1"
    lines: list[str] = []
    assert models.ensure_model(_spec(url, payload), tmp_path, out=lines.append) == "downloaded"
    assert any(f"bob:***@{host}/m.bin?X-Amz-Signature=***&expires=***" in ln for ln in lines)

    server.fail_next["m.bin"] = [403]
    with pytest.raises(models.ModelError) as failed:
        models.ensure_model(_spec(url, b"other"), tmp_path / "b", out=lines.append)
    assert "HTTP 403" in str(failed.value)
    for text in [*lines, str(failed.value)]:
        assert "s3cret" not in text, text


def test_server_errors_and_try_later_are_retried(
    server: FileServer, payload: bytes, tmp_path: Path
) -> None:
    server.fail_next["m.bin"] = [503, 429, 408]  # 0.5 + 1 + 2 s of backoff
    spec = _spec(server.url("m.bin"), payload)
    lines: list[str] = []
    assert models.ensure_model(spec, tmp_path, out=lines.append, stall_seconds=60) == "downloaded"
    assert [r.status for r in server.requests] == [503, 429, 408, 200]
    assert models.paths_for(tmp_path, spec).final.read_bytes() == payload
    assert any("transfer broken (HTTP 503)" in line for line in lines), lines


def test_repeated_drops_with_progress_complete(
    server: FileServer, payload: bytes, tmp_path: Path
) -> None:
    """No retry count: a link that breaks every 200 kB but keeps delivering finishes."""
    server.drop_every["m.bin"] = 200_000
    spec = _spec(server.url("m.bin"), payload)
    lines: list[str] = []
    assert models.ensure_model(spec, tmp_path, out=lines.append, stall_seconds=30) == "downloaded"
    assert models.paths_for(tmp_path, spec).final.read_bytes() == payload
    ranges = [r.range for r in server.requests]
    assert len(ranges) == -(-SIZE // 200_000)  # 16 attempts, far more than any retry count
    assert ranges == [None] + [f"bytes={n * 200_000}-" for n in range(1, len(ranges))]


def test_stalled_server_fails_after_the_stall_limit(
    server: FileServer, payload: bytes, tmp_path: Path
) -> None:
    server.stall_at["m.bin"] = 1_000_000  # sends 1 MB, then nothing, connection kept open
    spec = _spec(server.url("m.bin"), payload)
    lines: list[str] = []
    started = time.monotonic()
    with pytest.raises(models.ModelError) as caught:
        models.ensure_model(spec, tmp_path, out=lines.append, stall_seconds=2)
    elapsed = time.monotonic() - started
    message = str(caught.value)
    assert message.startswith("m.bin: no new data for "), message
    assert "XAGENT_DOWNLOAD_STALL_SECONDS=2" in message
    assert elapsed >= 2
    # what arrived is kept for the next run, which resumes there
    assert models.paths_for(tmp_path, spec).part.stat().st_size == 1_000_000
    server.resume()
    assert models.ensure_model(spec, tmp_path, out=lines.append) == "downloaded"
    assert server.requests[-1].range == "bytes=1000000-"


def test_server_that_restarts_from_zero_each_time_is_a_stall(
    server: FileServer, payload: bytes, tmp_path: Path
) -> None:
    """Bytes re-sent from offset 0 (Range ignored) after every drop are no progress."""
    server.ignore_range.add("m.bin")
    server.drop_every["m.bin"] = 300_000
    spec = _spec(server.url("m.bin"), payload)
    with pytest.raises(models.ModelError, match="no new data for"):
        models.ensure_model(spec, tmp_path, out=lambda _: None, stall_seconds=2)
    assert len(server.requests) >= 2
    assert {r.status for r in server.requests} == {200}


def test_slow_but_steady_download_is_not_cut_off(payload: bytes, tmp_path: Path) -> None:
    """32 kB every 0.1 s: takes about twice the stall limit in total, never stalls (gaps
    are 20 times shorter than the limit)."""
    data = payload[: 40 * 32 * 1024]
    srv = FileServer(files={"slow.bin": data}, chunk_size=32 * 1024, chunk_delay=0.1).start()
    try:
        spec = _spec(srv.url("slow.bin"), data, name="slow.bin")
        started = time.monotonic()
        result = models.ensure_model(spec, tmp_path, out=lambda _: None, stall_seconds=2)
        elapsed = time.monotonic() - started
    finally:
        srv.stop()
    assert result == "downloaded"
    assert elapsed > 3.9  # 40 chunks, 39 pauses of 0.1 s: in one request
    assert [r.range for r in srv.requests] == [None]
    assert models.paths_for(tmp_path, spec).final.read_bytes() == data


def test_file_url(payload: bytes, tmp_path: Path) -> None:
    source = tmp_path / "src" / "model file.bin"
    source.parent.mkdir()
    source.write_bytes(payload)
    dest = tmp_path / "models"
    dest.mkdir()
    spec = _spec(source.as_uri(), payload, name="local.bin")
    assert models.ensure_model(spec, dest, out=lambda _: None) == "downloaded"
    assert models.paths_for(dest, spec).final.read_bytes() == payload


def test_progress_lines_show_percent_and_speed(
    server: FileServer, payload: bytes, tmp_path: Path
) -> None:
    server.chunk_delay = 0.05
    spec = _spec(server.url("m.bin"), payload)
    lines: list[str] = []
    models.ensure_model(spec, tmp_path, out=lines.append, progress_interval=0.1)
    progress = [line for line in lines if "MB/s" in line]
    assert len(progress) >= 3, lines
    assert "100.0%" in progress[-1]
    assert all("%" in line for line in progress)


def test_stall_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    from xagent.settings import SettingsError

    base = {"database_url": "postgresql://x@127.0.0.1/x", "redis_url": "redis://127.0.0.1/0"}
    monkeypatch.delenv("XAGENT_DOWNLOAD_STALL_SECONDS", raising=False)
    assert load_settings(**base).download_stall_seconds == 120
    monkeypatch.setenv("XAGENT_DOWNLOAD_RETRIES", "3")  # old env files keep working
    monkeypatch.setenv("XAGENT_DOWNLOAD_STALL_SECONDS", "0")
    with pytest.raises(SettingsError, match=r"^XAGENT_DOWNLOAD_STALL_SECONDS: "):
        load_settings(**base)


def _settings(models_dir: Path, *specs: ModelSpec) -> Settings:
    return load_settings(
        database_url="postgresql://x@127.0.0.1/x",
        redis_url="redis://127.0.0.1/0",
        models_dir=models_dir,
        models=list(specs),
    )


def test_changed_model_failing_download_leaves_the_live_version(
    server: FileServer, payload: bytes, tmp_path: Path
) -> None:
    """The same name with new content goes to a new path: a failed download of the new
    content leaves the file (and stamp) the live release reads as they were."""
    live = _spec(server.url("m.bin"), payload)
    assert models.ensure_all(_settings(tmp_path, live), out=lambda _: None) == {
        "m.bin": "downloaded"
    }
    live_paths = models.paths_for(tmp_path, live)
    inode = live_paths.final.stat().st_ino
    broken = ModelSpec(name="m.bin", url=server.url("missing.bin"), sha256="1" * 64)
    with pytest.raises(models.ModelError, match="HTTP 404"):
        models.ensure_all(_settings(tmp_path, broken), out=lambda _: None)
    assert live_paths.final.stat().st_ino == inode
    assert models.check_all(_settings(tmp_path, live)) == []
    assert models.check_all(_settings(tmp_path, broken)) == ["m.bin missing or not verified"]


def test_a_full_disk_fails_at_once_naming_the_model(
    server: FileServer, payload: bytes, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ENOSPC while writing (the molecule faults scenario fills a real filesystem): no
    retrying until the stall limit, the model and the directory named, the part kept."""
    real_open = models._open_part

    class Full:
        def __init__(self, fh: Any) -> None:
            self.fh, self.written = fh, 0

        def write(self, data: bytes) -> int:
            if self.written + len(data) > 1024 * 1024:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            self.written += len(data)
            return int(self.fh.write(data))

        def __getattr__(self, name: str) -> Any:
            return getattr(self.fh, name)

        def __enter__(self) -> Full:
            return self

        def __exit__(self, *exc: object) -> None:
            self.fh.close()

    monkeypatch.setattr(models, "_open_part", lambda part, offset: Full(real_open(part, offset)))
    spec = _spec(server.url("m.bin"), payload)
    lines: list[str] = []
    with pytest.raises(models.ModelError) as caught:
        models.ensure_all(_settings(tmp_path, spec), out=lines.append)
    assert not [line for line in lines if "retrying" in line], lines  # waiting cannot help
    assert str(caught.value) == (
        f"m.bin: cannot write {models.paths_for(tmp_path, spec).part.name} in {tmp_path}: "
        "No space left on device (partial file kept for the next run)"
    )
    assert models.paths_for(tmp_path, spec).part.exists()
    assert not models.paths_for(tmp_path, spec).final.exists()


def test_old_versions_are_pruned_keeping_the_one_before(tmp_path: Path) -> None:
    """Three versions of one name in turn: the wanted one and the one verified before it
    stay (the live release's, a rollback's), the oldest goes, so do other partials."""
    sources = tmp_path / "src"
    sources.mkdir()
    dest = tmp_path / "models"
    specs = []
    for n in range(3):
        data = f"version {n}".encode()
        (sources / f"v{n}").write_bytes(data)
        specs.append(_spec((sources / f"v{n}").as_uri(), data, name="m.bin"))
    other = _spec((sources / "v0").as_uri(), b"version 0", name="other.bin")
    for n, spec in enumerate(specs):
        models.ensure_all(_settings(dest, spec, other), out=lambda _: None)
        os.utime(models.paths_for(dest, spec).stamp, (1000 + n, 1000 + n))
    stray = models.paths_for(dest, _spec("file:///x", b"never finished", name="m.bin")).part
    stray.write_bytes(b"never")
    lines: list[str] = []
    models.ensure_all(_settings(dest, specs[2], other), out=lines.append)
    kept = {models.file_name(s) for s in (specs[1], specs[2], other)}
    assert {p.name for p in dest.iterdir() if not p.name.startswith(".")} == kept
    assert not stray.exists()
    assert not models.paths_for(dest, specs[0]).stamp.exists()
    assert any("removed old versions" in line for line in lines), lines


def test_the_live_release_models_are_never_pruned(tmp_path: Path) -> None:
    """Live X; a deploy of Y downloads Y and then fails (Y verified last); a deploy of Z:
    the version verified last before Z is Y, yet X is what the live release reads. With the
    deploy's list of the live models X stays; an unreadable list removes nothing."""
    sources = tmp_path / "src"
    sources.mkdir()
    dest = tmp_path / "models"
    for v in "xyzw":
        (sources / v).write_bytes(v.encode())
    x, y, z, w = (_spec((sources / v).as_uri(), v.encode()) for v in "xyzw")
    for n, spec in enumerate((x, y)):
        models.ensure_all(_settings(dest, spec), out=lambda _: None)
        os.utime(models.paths_for(dest, spec).stamp, (1000 + n, 1000 + n))
    (dest / models.LIVE_FILE).write_text(json.dumps([{"name": x.name, "sha256": x.sha256}]))
    models.ensure_all(_settings(dest, z), out=lambda _: None)
    assert {p.name for p in dest.iterdir() if not p.name.startswith(".")} == {
        models.file_name(s) for s in (x, y, z)
    }
    assert models.check_all(_settings(dest, x)) == []
    # Z went live; the next deploy (W) finds a list it cannot read: nothing is removed
    os.utime(models.paths_for(dest, z).stamp, (2000, 2000))
    (dest / models.LIVE_FILE).write_text("not json")
    lines: list[str] = []
    models.ensure_all(_settings(dest, w), out=lines.append)
    assert any("cannot be read; no old version removed" in line for line in lines), lines
    assert len([p for p in dest.iterdir() if not p.name.startswith(".")]) == 4
    (dest / models.LIVE_FILE).write_text(json.dumps([{"name": z.name, "sha256": z.sha256}]))
    models.ensure_all(_settings(dest, w), out=lambda _: None)
    # with the list: wanted W, live Z, and the newest other (Y, verified after X)
    assert {p.name for p in dest.iterdir() if not p.name.startswith(".")} == {
        models.file_name(s) for s in (w, z, y)
    }


def test_file_of_the_old_layout_is_adopted_without_download(payload: bytes, tmp_path: Path) -> None:
    """Before content addressing the file was ``NAME`` with ``.NAME.verified``: an upgrade
    gives it its new name by a hard link (the old release keeps reading ``NAME``)."""
    spec = _spec("http://127.0.0.1:9/never-used", payload)
    old = tmp_path / "m.bin"
    old.write_bytes(payload)
    st = old.stat()
    (tmp_path / ".m.bin.verified").write_text(
        f"{spec.sha256} {st.st_size} {st.st_mtime_ns}\n", encoding="ascii"
    )
    assert models.ensure_all(_settings(tmp_path, spec), out=lambda _: None) == {"m.bin": "present"}
    new = models.paths_for(tmp_path, spec).final
    assert new.stat().st_ino == old.stat().st_ino
    assert models.check_all(_settings(tmp_path, spec)) == []
