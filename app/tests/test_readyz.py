"""/readyz: 503 with a JSON reason until PostgreSQL, Redis and every model are OK."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path

import httpx

from conftest import HTTP_TIMEOUT, RedisServer, Stack, base_env, run_bootstrap


def test_readyz_is_503_until_models_exist(
    session_db: str,
    queue_name: str,
    tmp_path: Path,
    stack_factory: Callable[[dict[str, str]], Stack],
) -> None:
    source = tmp_path / "published" / "tiny.gguf"
    source.parent.mkdir()
    data = os.urandom(300_000)
    source.write_bytes(data)
    spec = {"name": "tiny.gguf", "url": source.as_uri(), "sha256": hashlib.sha256(data).hexdigest()}
    env = base_env(session_db, queue_name, tmp_path / "models", XAGENT_MODELS=json.dumps([spec]))
    stack = stack_factory(env)
    base_url = stack.web()

    resp = httpx.get(f"{base_url}/readyz")
    assert resp.status_code == 503
    assert resp.json() == {"ready": False, "reason": "models: tiny.gguf missing or not verified"}
    # the web process never downloads anything by itself
    assert not list((tmp_path / "models").glob("tiny.gguf*"))

    result = run_bootstrap(env, "models")
    assert result.returncode == 0, result.stderr
    resp = httpx.get(f"{base_url}/readyz")
    assert resp.status_code == 200, resp.text

    # a tampered file (size/mtime no longer match the stamp) is not ready any more
    (tmp_path / "models" / f"tiny.gguf@{spec['sha256'][:32]}").write_bytes(b"tampered")
    assert httpx.get(f"{base_url}/readyz").status_code == 503


def test_readyz_is_503_when_redis_is_down(
    session_db: str,
    queue_name: str,
    tmp_path: Path,
    stack_factory: Callable[[dict[str, str]], Stack],
) -> None:
    env = base_env(session_db, queue_name, tmp_path / "models")
    stack = stack_factory(env)
    base_url = stack.web()
    assert httpx.get(f"{base_url}/readyz").status_code == 200
    # a second web process whose Redis URL points at a closed port still serves /healthz
    bad = dict(env, XAGENT_REDIS_URL="redis://127.0.0.1:9/0")
    bad_url = _web_without_broker_startup(stack, bad)
    assert httpx.get(f"{bad_url}/healthz").status_code == 200
    resp = httpx.get(f"{bad_url}/readyz", timeout=15)
    assert resp.status_code == 503
    assert resp.json()["reason"].startswith("redis: ")


def _web_without_broker_startup(stack: Stack, env: dict[str, str]) -> str:
    return stack.web(env=env)


def test_runs_are_accepted_right_after_redis_restarts(
    session_db: str,
    queue_name: str,
    tmp_path: Path,
    stack_factory: Callable[[dict[str, str]], Stack],
    redis_server: RedisServer,
) -> None:
    """Pooled connections that a Redis restart closed are retried on a new connection: the
    first enqueue after the restart succeeds instead of answering 503."""
    redis_server.start()
    env = base_env(session_db, queue_name, tmp_path / "models", XAGENT_REDIS_URL=redis_server.url)
    base_url = stack_factory(env).web()
    run = {"tool": "sleep", "args": {"seconds": 1}}
    with httpx.Client(base_url=base_url, timeout=HTTP_TIMEOUT) as client:
        assert [client.post("/runs", json=run).status_code for _ in range(3)] == [202] * 3
        redis_server.stop()
        redis_server.start()
        after = [client.post("/runs", json=run) for _ in range(5)]
    assert [r.status_code for r in after] == [202] * 5, [r.text for r in after]
