"""Model downloads: verify, skip when verified, resume after a dropped connection, refuse a
wrong checksum, file:// sources, progress lines."""

from __future__ import annotations

import hashlib
import os
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
    with pytest.raises(models.ModelError, match="sha256 mismatch"):
        models.ensure_model(spec, tmp_path, out=lambda _: None)
    assert _leftovers(tmp_path) == []


def test_stale_file_with_wrong_content_is_replaced(
    server: FileServer, payload: bytes, tmp_path: Path
) -> None:
    (tmp_path / "m.bin").write_bytes(b"old model")
    spec = _spec(server.url("m.bin"), payload)
    assert models.ensure_model(spec, tmp_path, out=lambda _: None) == "downloaded"
    assert (tmp_path / "m.bin").read_bytes() == payload


def test_existing_verified_file_without_stamp_is_hashed_once(
    payload: bytes, tmp_path: Path
) -> None:
    (tmp_path / "m.bin").write_bytes(payload)
    spec = _spec("http://127.0.0.1:9/never-used", payload)
    assert models.ensure_model(spec, tmp_path, out=lambda _: None) == "present"
    assert (tmp_path / ".m.bin.verified").exists()


def test_http_error_is_reported(server: FileServer, tmp_path: Path) -> None:
    spec = ModelSpec(name="x", url=server.url("missing"), sha256="1" * 64)
    with pytest.raises(models.ModelError, match="HTTP 404"):
        models.ensure_model(spec, tmp_path, out=lambda _: None)


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
