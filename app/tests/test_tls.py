"""TLS to Redis and PostgreSQL (traffic between hosts): the app connects with the CA the
deployment gives it (``XAGENT_REDIS_SSL_CA``, ``XAGENT_DATABASE_SSL_CA``) and a password;
a connection without TLS, with a certificate of another CA, or without the password is
refused.

Each test runs its own server on a free loopback port with a certificate made here by
``openssl`` (a CA of the test, the server's certificate naming 127.0.0.1), configured as the
redis and postgresql roles configure theirs: Redis only on its TLS port (``port 0``), clients
authenticated by password, not certificate; PostgreSQL ``hostssl`` with scram-sha-256 and
``hostnossl ... reject``.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import ssl
import subprocess
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import pytest
import redis
from sqlalchemy import text

from conftest import BIN, Proc, base_env, free_port, run_bootstrap, wait_until
from test_pgwait import ThrowawayPostgres, _pg_bindir
from xagent import db, pgwait
from xagent.settings import Settings, SettingsError, load_settings

REDIS_USER = "xagent"
REDIS_PASSWORD = "tls-test-redis-pw"
PG_PASSWORD = "tls-test-pg-pw"


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True)


def make_ca(directory: Path, name: str) -> Path:
    """A self-signed CA (key and certificate in ``directory``); returns the certificate."""
    directory.mkdir(parents=True, exist_ok=True)
    key, cert = directory / "ca.key", directory / "ca.crt"
    _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
             "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "2", "-subj", f"/CN={name}",
             "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign")  # fmt: skip
    return cert


def make_server_cert(ca_dir: Path, directory: Path, owner: str | None = None) -> tuple[Path, Path]:
    """A server certificate for IP 127.0.0.1 signed by the CA in ``ca_dir``: (cert, key)."""
    directory.mkdir(parents=True, exist_ok=True)
    key, csr, cert = directory / "server.key", directory / "server.csr", directory / "server.crt"
    ext = directory / "server.ext"
    ext.write_text("subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\n")
    _openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
             "-keyout", str(key), "-out", str(csr), "-subj", "/CN=127.0.0.1")  # fmt: skip
    _openssl("x509", "-req", "-in", str(csr), "-CA", str(ca_dir / "ca.crt"),
             "-CAkey", str(ca_dir / "ca.key"), "-CAcreateserial", "-days", "2",
             "-extfile", str(ext), "-out", str(cert))  # fmt: skip
    key.chmod(0o600)
    if owner:
        for path in (directory, key, cert):
            shutil.chown(path, owner, owner)
    return cert, key


@pytest.fixture
def pki(tmp_path: Path) -> dict[str, Path]:
    if shutil.which("openssl") is None:
        pytest.skip("openssl not installed")
    ca = make_ca(tmp_path / "ca", "xagent-test-ca")
    other = make_ca(tmp_path / "other-ca", "someone-else")
    return {"ca": ca, "ca_dir": tmp_path / "ca", "other_ca": other}


# -- Redis --------------------------------------------------------------------------------


@pytest.fixture
def tls_redis(tmp_path: Path, pki: dict[str, Path]) -> Iterator[int]:
    exe = shutil.which("redis-server")
    if exe is None:
        pytest.skip("redis-server not installed")
    cert, key = make_server_cert(pki["ca_dir"], tmp_path / "redis-tls")
    port = free_port()
    argv = [exe, "--bind", "127.0.0.1", "--port", "0", "--tls-port", str(port)]
    argv += ["--tls-cert-file", str(cert), "--tls-key-file", str(key)]
    argv += ["--tls-ca-cert-file", str(pki["ca"]), "--tls-auth-clients", "no"]
    argv += ["--save", "", "--appendonly", "no", "--dir", str(tmp_path)]
    # the roles' ACL: the default user is not the app's; the app's user has a password
    argv += [
        "--user",
        "default",
        "off",
        "--user",
        REDIS_USER,
        "on",
        f">{REDIS_PASSWORD}",
        "~*",
        "+@all",
    ]
    proc = Proc("redis-tls", argv, dict(os.environ), tmp_path)
    try:
        proc.wait_for_log(r"Ready to accept connections", timeout=20)
        yield port
    finally:
        proc.stop(signal.SIGKILL)


def _redis_env(port: int, ca: Path, tmp_path: Path, **extra: str) -> dict[str, str]:
    env = base_env("postgresql+asyncpg://xagent@127.0.0.1:1/unused", "tlsq", tmp_path / "models")
    env.update(
        XAGENT_REDIS_URL=f"rediss://{REDIS_USER}@127.0.0.1:{port}/0",
        XAGENT_REDIS_PASSWORD=REDIS_PASSWORD,
        XAGENT_REDIS_SSL_CA=str(ca),
    )
    env.update(extra)
    return env


def _settings(env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> Settings:
    for key in list(os.environ):
        if key.startswith("XAGENT_") or key == "CREDENTIALS_DIRECTORY":
            monkeypatch.delenv(key)
    for key, value in env.items():
        if key.startswith("XAGENT_"):
            monkeypatch.setenv(key, value)
    return load_settings()


def test_redis_over_tls_with_the_ca_and_password(
    tls_redis: int, pki: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    env = _redis_env(tls_redis, pki["ca"], tmp_path)
    settings = _settings(env, monkeypatch)
    client = redis.Redis.from_url(settings.redis_url, **settings.redis_kwargs())
    assert client.ping()
    assert client.connection_pool.connection_class is redis.SSLConnection

    # the broker and result backend (taskiq-redis) get the same URL and arguments
    # imported here: importing xagent.broker builds a broker from the environment
    from xagent.broker import make_broker

    async def through_broker() -> None:
        broker = make_broker(settings)
        await broker.startup()  # XGROUP CREATE over TLS
        try:
            assert broker.result_backend is not None
            assert not await broker.result_backend.is_result_ready("tls-probe")
        finally:
            await broker.shutdown()

    asyncio.run(through_broker())

    # a real CLI of the app (the readiness check) as a unit runs it: settings from the env
    result = subprocess.run(
        [str(BIN / "xagent-check"), "queue"],
        env=env, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert '"stream": "tlsq"' in result.stdout


def test_redis_refuses_plain_other_ca_and_no_password(
    tls_redis: int, pki: dict[str, Path], tmp_path: Path
) -> None:
    port = tls_redis
    # no TLS: the server only has its TLS port, a clear-text client gets nothing back
    plain = redis.Redis(
        host="127.0.0.1", port=port, username=REDIS_USER, password=REDIS_PASSWORD,
        socket_timeout=3, socket_connect_timeout=3,
    )  # fmt: skip
    with pytest.raises(redis.ConnectionError):
        plain.ping()
    # TLS, but the server's certificate does not chain to the CA the client trusts
    other = redis.Redis(
        host="127.0.0.1", port=port, username=REDIS_USER, password=REDIS_PASSWORD, ssl=True,
        ssl_ca_certs=str(pki["other_ca"]), ssl_cert_reqs="required", socket_timeout=3,
    )  # fmt: skip
    with pytest.raises(redis.ConnectionError, match=r"(?i)certificate verify failed"):
        other.ping()
    # TLS with the right CA, without the password: the default user is off
    anonymous = redis.Redis(
        host="127.0.0.1", port=port, ssl=True, ssl_ca_certs=str(pki["ca"]),
        ssl_cert_reqs="required", socket_timeout=3,
    )  # fmt: skip
    with pytest.raises(redis.AuthenticationError):
        anonymous.ping()
    # and the app's CLI with the wrong CA fails, naming the cause
    env = _redis_env(port, pki["other_ca"], tmp_path)
    result = subprocess.run(
        [str(BIN / "xagent-check"), "queue"],
        env=env, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 1
    assert "certificate verify failed" in result.stderr


def test_redis_ca_setting_is_checked(
    pki: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    env = _redis_env(1, pki["ca"], tmp_path, XAGENT_REDIS_URL="redis://127.0.0.1:1/0")
    with pytest.raises(SettingsError, match=r"^XAGENT_REDIS_SSL_CA: needs a rediss:// "):
        _settings(env, monkeypatch)
    env = _redis_env(1, tmp_path / "missing.crt", tmp_path)
    with pytest.raises(SettingsError, match=r"^XAGENT_REDIS_SSL_CA: .*missing.crt: not a readable"):
        _settings(env, monkeypatch)
    # empty (what the roles render for "no TLS"): none
    env = _redis_env(1, pki["ca"], tmp_path, XAGENT_REDIS_SSL_CA="", XAGENT_DATABASE_SSL_CA="")
    settings = _settings(env, monkeypatch)
    assert settings.redis_ssl_ca is None
    assert settings.database_ssl_ca is None


# -- PostgreSQL ---------------------------------------------------------------------------


@pytest.fixture
def tls_pg(pki: dict[str, Path]) -> Iterator[ThrowawayPostgres]:
    bindir = _pg_bindir()
    if bindir is None:
        pytest.skip("no PostgreSQL server binaries (initdb) on this machine")
    pg = ThrowawayPostgres(bindir, free_port())
    try:
        pg.init()
        cert, key = make_server_cert(pki["ca_dir"], pg.root / "tls", owner=pg.user)
        # what the postgresql role writes for app hosts elsewhere
        (pg.data / "pg_hba.conf").write_text(
            "local all all trust\n"
            "hostnossl all all 127.0.0.1/32 reject\n"
            "hostssl all all 127.0.0.1/32 scram-sha-256\n"
        )
        pg.extra_settings = {"ssl": "on", "ssl_cert_file": str(cert), "ssl_key_file": str(key)}
        pg.start()

        def ready() -> bool:
            done = subprocess.run(
                [str(bindir / "pg_isready"), "-q", "-h", str(pg.data), "-p", str(pg.port)],
                check=False,
            )
            return done.returncode == 0

        wait_until(ready, timeout=30, what="the TLS PostgreSQL")
        subprocess.run(
            [str(bindir / "psql"), "-h", str(pg.data), "-p", str(pg.port), "-U", "xagent",
             "-d", "postgres", "-Xqc", f"ALTER ROLE xagent PASSWORD '{PG_PASSWORD}'"],
            check=True, capture_output=True, user=pg.user,
        )  # fmt: skip
        yield pg
    finally:
        pg.stop()


async def _connect(port: int, **kwargs: object) -> None:
    conn = await asyncpg.connect(
        host="127.0.0.1", port=port, user="xagent", database="postgres", timeout=5, **kwargs
    )
    await conn.close()


def test_postgresql_over_tls_with_the_ca_and_password(
    tls_pg: ThrowawayPostgres, pki: dict[str, Path], tmp_path: Path
) -> None:
    db_url = f"postgresql+asyncpg://xagent@127.0.0.1:{tls_pg.port}/postgres"
    env = base_env(db_url, "tlsq", tmp_path / "models")
    env.update(XAGENT_DATABASE_PASSWORD=PG_PASSWORD, XAGENT_DATABASE_SSL_CA=str(pki["ca"]))
    # the one-time work (migrations) through the app's engine
    result = run_bootstrap(env, "migrate")
    assert result.returncode == 0, result.stderr + tls_pg.log()

    async def engine_is_tls() -> bool:
        settings = load_settings(
            database_url=db_url, redis_url="redis://127.0.0.1:1/0",
            database_password=PG_PASSWORD, database_ssl_ca=str(pki["ca"]),
        )  # fmt: skip
        engine = db.make_engine(settings)
        try:
            async with engine.connect() as conn:
                value = await conn.scalar(
                    text("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
                )
                return bool(value)
        finally:
            await engine.dispose()

    assert asyncio.run(engine_is_tls())


def test_postgresql_refuses_plain_other_ca_and_no_password(
    tls_pg: ThrowawayPostgres, pki: dict[str, Path], tmp_path: Path
) -> None:
    port = tls_pg.port
    # no TLS, right password: pg_hba's hostnossl ... reject
    with pytest.raises(asyncpg.InvalidAuthorizationSpecificationError, match="no encryption"):
        asyncio.run(_connect(port, password=PG_PASSWORD, ssl=False))
    # TLS without the password
    with pytest.raises((asyncpg.InvalidPasswordError, asyncpg.ClientCannotConnectError)):
        asyncio.run(_connect(port, ssl=ssl.create_default_context(cafile=str(pki["ca"]))))
    # TLS, right password, a CA that did not sign the server's certificate: refused by the
    # client, and the bootstrap fails at once (waiting would not help)
    db_url = f"postgresql+asyncpg://xagent@127.0.0.1:{port}/postgres"
    env = base_env(db_url, "tlsq", tmp_path / "models")
    env.update(XAGENT_DATABASE_PASSWORD=PG_PASSWORD, XAGENT_DATABASE_SSL_CA=str(pki["other_ca"]))
    env["XAGENT_BOOTSTRAP_WAIT_SECONDS"] = "60"
    result = run_bootstrap(env, "migrate")
    assert result.returncode == 1
    assert "certificate verify failed" in result.stderr
    assert "cannot use postgresql" in result.stderr, result.stderr
    assert "waiting for postgresql" not in result.stdout


def test_cert_verification_error_is_not_retryable() -> None:
    assert not pgwait.is_retryable(ssl.SSLCertVerificationError("certificate verify failed"))
    assert pgwait.is_retryable(ConnectionRefusedError("refused"))
