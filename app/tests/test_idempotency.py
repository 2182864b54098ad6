"""POST /runs with an Idempotency-Key: a retry of the same request returns the same run
(never a second one), another request under the same key is refused, a malformed key is
refused, and a retry after the queue was unavailable queues the run that failed."""

from __future__ import annotations

import subprocess
import sys
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import redis

from conftest import HTTP_TIMEOUT, TEST_REDIS_URL, RedisServer, Stack, base_env, sql

RUN = {"tool": "calculator", "args": {"op": "add", "a": 1, "b": 2}}


def _runs_of_key(db_url: str, key: str) -> list[str]:
    rows = sql(
        db_url,
        "SELECT r.status FROM runs r JOIN run_keys k ON k.run_id = r.id WHERE k.key = $1",
        key,
    )
    return [r["status"] for r in rows]


def test_same_key_same_run_other_request_refused_bad_key_refused(
    session_db: str,
    queue_name: str,
    tmp_path: Path,
    stack_factory: Callable[[dict[str, str]], Stack],
) -> None:
    base_url = stack_factory(base_env(session_db, queue_name, tmp_path / "models")).web(workers=2)
    key = f"test-{uuid.uuid4()}"
    before = sql(session_db, "SELECT count(*) AS n FROM runs")[0]["n"]
    with httpx.Client(base_url=base_url, timeout=HTTP_TIMEOUT) as client:
        headers = {"Idempotency-Key": f'"{key}"'}
        # eight at once (a client and a proxy retrying side by side): one run
        with ThreadPoolExecutor(8) as pool:
            answers = list(
                pool.map(lambda _: client.post("/runs", json=RUN, headers=headers), range(8))
            )
        assert {r.status_code for r in answers} == {202}, [r.text for r in answers]
        assert len({r.json()["id"] for r in answers}) == 1
        replayed = [r.headers.get("idempotent-replayed") for r in answers]
        assert replayed.count("true") == 7, replayed
        # the bare form of the same key is the same key
        again = client.post("/runs", json=RUN, headers={"Idempotency-Key": key})
        assert again.status_code == 202
        assert again.json()["id"] == answers[0].json()["id"]

        other = client.post(
            "/runs", json={**RUN, "args": {"op": "add", "a": 1, "b": 3}}, headers=headers
        )
        assert other.status_code == 422, other.text
        assert "was used for another request" in other.json()["detail"]

        for bad in ['"has space"', '"' + "x" * 256 + '"', '""']:
            resp = client.post("/runs", json=RUN, headers={"Idempotency-Key": bad})
            assert resp.status_code == 400, (bad, resp.text)
            assert "Idempotency-Key" in resp.json()["detail"]

        # without a key every POST is a run of its own
        plain = [client.post("/runs", json=RUN).json()["id"] for _ in range(2)]
        assert plain[0] != plain[1]
    after = sql(session_db, "SELECT count(*) AS n FROM runs")[0]["n"]
    assert after - before == 3
    assert len(_runs_of_key(session_db, key)) == 1


def test_retry_after_the_queue_was_down_queues_the_failed_run(
    session_db: str,
    queue_name: str,
    tmp_path: Path,
    stack_factory: Callable[[dict[str, str]], Stack],
    redis_server: RedisServer,
) -> None:
    redis_server.start()
    env = base_env(session_db, queue_name, tmp_path / "models", XAGENT_REDIS_URL=redis_server.url)
    base_url = stack_factory(env).web()
    key = f"test-{uuid.uuid4()}"
    headers = {"Idempotency-Key": f'"{key}"'}
    with httpx.Client(base_url=base_url, timeout=HTTP_TIMEOUT) as client:
        assert client.post("/runs", json=RUN).status_code == 202
        redis_server.stop()
        down = client.post("/runs", json=RUN, headers=headers)
        assert down.status_code == 503, down.text
        assert _runs_of_key(session_db, key) == ["failed"]
        redis_server.start()
        retry = client.post("/runs", json=RUN, headers=headers)
    assert retry.status_code == 202, retry.text
    assert retry.json()["status"] == "queued"
    assert retry.headers["idempotent-replayed"] == "true"
    assert _runs_of_key(session_db, key) == ["queued"]
    rows = sql(session_db, "SELECT error FROM runs WHERE id = $1", uuid.UUID(retry.json()["id"]))
    assert rows[0]["error"] is None


def test_a_retry_sends_the_message_of_a_run_still_queued_again(
    session_db: str,
    queue_name: str,
    tmp_path: Path,
    stack_factory: Callable[[dict[str, str]], Stack],
) -> None:
    """The first request committed its run and died before its message reached the stream
    (the chaos step kills the web's master): the client's retry with the same key finds
    the run queued and sends its message again, instead of leaving it to the sweeper."""
    base_url = stack_factory(base_env(session_db, queue_name, tmp_path / "models")).web()
    headers = {"Idempotency-Key": f"test-{uuid.uuid4()}"}
    client = redis.Redis.from_url(TEST_REDIS_URL)
    with httpx.Client(base_url=base_url, timeout=HTTP_TIMEOUT) as http:
        first = http.post("/runs", json=RUN, headers=headers)
        assert first.status_code == 202, first.text
        run_id = first.json()["id"]
        assert run_id in str(client.xrange(queue_name))
        client.delete(queue_name)  # the message is lost
        retry = http.post("/runs", json=RUN, headers=headers)
    assert retry.status_code == 202, retry.text
    assert retry.json() == {"id": run_id, "status": "queued"}
    assert run_id in str(client.xrange(queue_name))


ENQUEUE_RACE = """
import asyncio, sys, uuid
from fastapi import HTTPException
from sqlalchemy import insert, select
from xagent import db, main

async def go() -> None:
    engine = db.make_engine(main.settings)
    rid = uuid.uuid4()
    async with engine.begin() as conn:
        await conn.execute(insert(db.runs).values(id=rid, status="running", input={}, attempts=1))
    def broken_kicker():
        raise ConnectionError("reply lost after the message was added")
    main.run_agent.kicker = broken_kicker
    try:
        await main._enqueue(engine, rid)
    except HTTPException as exc:
        assert exc.status_code == 503
    async with engine.connect() as conn:
        query = select(db.runs.c.status, db.runs.c.error).where(db.runs.c.id == rid)
        row = (await conn.execute(query)).one()
    await engine.dispose()
    print(row.status, row.error)

asyncio.run(go())
"""


def test_a_failed_enqueue_never_overwrites_a_run_a_receiver_owns(
    session_db: str, queue_name: str, tmp_path: Path
) -> None:
    """The enqueue may fail after the message reached Redis (a lost reply): a receiver may
    already run it. The failure path marks only a run that is still queued."""
    env = base_env(session_db, queue_name, tmp_path / "models")
    result = subprocess.run(
        [sys.executable, "-c", ENQUEUE_RACE],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["running", "None"]
