"""Model downloads: verify, skip when verified, resume after a dropped connection, refuse a
wrong checksum, file:// sources, progress lines; a stall limit instead of a retry count or a
total time limit."""

from __future__ import annotations

import hashlib
import os
import re
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from fileserver import FileServer
from xagent import models
from xagent.settings import ModelSpec

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
    assert (tmp_path / "m.bin").read_bytes() == payload
    assert models.stamp_ok(models.paths_for(tmp_path, spec), spec.sha256)
    assert _leftovers(tmp_path) == [".m.bin.verified", "m.bin"]
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
    assert (tmp_path / "m.bin").read_bytes() == payload
    assert [r.range for r in server.requests] == [None, f"bytes={cut}-"]
    assert any("transfer broken" in line for line in lines), lines
    assert any(f"resuming at {cut} bytes" in line for line in lines), lines


def test_partial_file_from_an_earlier_run_is_resumed(
    server: FileServer, payload: bytes, tmp_path: Path
) -> None:
    spec = _spec(server.url("m.bin"), payload)
    (tmp_path / ".m.bin.part").write_bytes(payload[:500_000])
    assert models.ensure_model(spec, tmp_path, out=lambda _: None) == "downloaded"
    assert [r.range for r in server.requests] == ["bytes=500000-"]
    assert (tmp_path / "m.bin").read_bytes() == payload


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


def test_stale_file_with_wrong_content_is_replaced(
    server: FileServer, payload: bytes, tmp_path: Path
) -> None:
    (tmp_path / "m.bin").write_bytes(b"old model")
    spec = _spec(server.url("m.bin"), payload)
    assert models.ensure_model(spec, tmp_path, out=lambda _: None) == "downloaded"
    assert (tmp_path / "m.bin").read_bytes() == payload


def test_existing_verified_file_without_stamp_is_hashed_once(
    payload: bytes, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    hashed: list[Path] = []
    real_sha256_file = models.sha256_file

    def counting_sha256_file(path: Path) -> str:
        hashed.append(path)
        return real_sha256_file(path)

    monkeypatch.setattr(models, "sha256_file", counting_sha256_file)
    (tmp_path / "m.bin").write_bytes(payload)
    spec = _spec("http://127.0.0.1:9/never-used", payload)
    assert models.ensure_model(spec, tmp_path, out=lambda _: None) == "present"
    assert hashed == [tmp_path / "m.bin"]
    assert (tmp_path / ".m.bin.verified").exists()
    # the second run (the next boot) trusts the stamp: no re-hash of a large file
    assert models.ensure_model(spec, tmp_path, out=lambda _: None) == "present"
    assert hashed == [tmp_path / "m.bin"]


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
    assert (tmp_path / "m.bin").read_bytes() == payload
    assert any("transfer broken (HTTP 503)" in line for line in lines), lines


def test_repeated_drops_with_progress_complete(
    server: FileServer, payload: bytes, tmp_path: Path
) -> None:
    """No retry count: a link that breaks every 200 kB but keeps delivering finishes."""
    server.drop_every["m.bin"] = 200_000
    spec = _spec(server.url("m.bin"), payload)
    lines: list[str] = []
    assert models.ensure_model(spec, tmp_path, out=lines.append, stall_seconds=30) == "downloaded"
    assert (tmp_path / "m.bin").read_bytes() == payload
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
    assert (tmp_path / ".m.bin.part").stat().st_size == 1_000_000
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
    assert (tmp_path / "slow.bin").read_bytes() == data


def test_file_url(payload: bytes, tmp_path: Path) -> None:
    source = tmp_path / "src" / "model file.bin"
    source.parent.mkdir()
    source.write_bytes(payload)
    dest = tmp_path / "models"
    dest.mkdir()
    spec = _spec(source.as_uri(), payload, name="local.bin")
    assert models.ensure_model(spec, dest, out=lambda _: None) == "downloaded"
    assert (dest / "local.bin").read_bytes() == payload


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
    from xagent.settings import SettingsError, load_settings

    base = {"database_url": "postgresql://x@127.0.0.1/x", "redis_url": "redis://127.0.0.1/0"}
    monkeypatch.delenv("XAGENT_DOWNLOAD_STALL_SECONDS", raising=False)
    assert load_settings(**base).download_stall_seconds == 120
    monkeypatch.setenv("XAGENT_DOWNLOAD_RETRIES", "3")  # old env files keep working
    monkeypatch.setenv("XAGENT_DOWNLOAD_STALL_SECONDS", "0")
    with pytest.raises(SettingsError, match=r"^XAGENT_DOWNLOAD_STALL_SECONDS: "):
        load_settings(**base)
