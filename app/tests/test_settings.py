"""Settings: environment, credential files, one-line errors naming the variable."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from xagent.settings import SettingsError, load_settings

BASE = {
    "XAGENT_DATABASE_URL": "postgresql://xagent@127.0.0.1:5432/xagent",
    "XAGENT_REDIS_URL": "redis://127.0.0.1:6379/0",
}


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    import os

    for key in list(os.environ):
        if key.startswith("XAGENT_") or key == "CREDENTIALS_DIRECTORY":
            monkeypatch.delenv(key)
    for key, value in BASE.items():
        monkeypatch.setenv(key, value)
    return monkeypatch


def test_defaults_and_driver(env: pytest.MonkeyPatch) -> None:
    settings = load_settings()
    assert settings.database_url == "postgresql+asyncpg://xagent@127.0.0.1:5432/xagent"
    assert settings.models == []
    assert settings.root_username == "root"
    assert settings.tick_cron == "* * * * *"
    assert settings.host_name
    # production defaults of the delivery guarantees: a dead receiver's run is taken over
    # within about a minute; the lease fits in the idle timeout, heartbeats fit in the lease
    assert settings.stream_idle_timeout_ms == 60_000
    assert settings.reclaim_interval_seconds == 10
    assert settings.run_lease_seconds == 30
    assert settings.heartbeat_seconds == 10
    assert settings.run_stuck_seconds == 300
    assert settings.run_max_attempts == 5
    assert settings.scheduler_lease_seconds == 15
    assert (settings.database_pool_size, settings.database_max_overflow) == (5, 5)


def test_database_pool_from_environment(env: pytest.MonkeyPatch) -> None:
    env.setenv("XAGENT_DATABASE_POOL_SIZE", "2")
    env.setenv("XAGENT_DATABASE_MAX_OVERFLOW", "0")
    settings = load_settings()
    assert (settings.database_pool_size, settings.database_max_overflow) == (2, 0)


def test_run_lease_and_heartbeat_follow_the_idle_timeout(env: pytest.MonkeyPatch) -> None:
    env.setenv("XAGENT_STREAM_IDLE_TIMEOUT_MS", "3000")
    settings = load_settings()
    assert settings.run_lease_seconds == 1.5
    assert settings.heartbeat_seconds == 0.5
    assert settings.run_stuck_seconds == 300
    env.setenv("XAGENT_STREAM_IDLE_TIMEOUT_MS", "600000")
    settings = load_settings()
    assert (settings.run_lease_seconds, settings.heartbeat_seconds) == (300, 10)
    assert settings.run_stuck_seconds == 1200


def test_models_json(env: pytest.MonkeyPatch) -> None:
    env.setenv(
        "XAGENT_MODELS",
        '[{"name": "a.bin", "url": "https://example.invalid/a", "sha256": "' + "A" * 64 + '"}]',
    )
    (spec,) = load_settings().models
    assert spec.name == "a.bin"
    assert spec.sha256 == "a" * 64


@pytest.mark.parametrize(
    ("var", "value", "message"),
    [
        ("XAGENT_MODELS", "[{", "XAGENT_MODELS: not valid JSON"),
        ("XAGENT_MODELS", '{"name": "x"}', "XAGENT_MODELS: must be a JSON list"),
        (
            "XAGENT_MODELS",
            '[{"name": "../x", "url": "file:///x", "sha256": "' + "0" * 64 + '"}]',
            "XAGENT_MODELS[0].[name]: model name '../x' is not a safe file name",
        ),
        (
            "XAGENT_MODELS",
            '[{"name": "x", "url": "ftp://h/x", "sha256": "' + "0" * 64 + '"}]',
            "must be http(s):// or file://",
        ),
        ("XAGENT_MODELS", '[{"name": "x", "url": "file:///x", "sha256": "12"}]', "64 hex"),
        ("XAGENT_DATABASE_URL", "mysql://h/db", "XAGENT_DATABASE_URL: must be a postgresql"),
        ("XAGENT_REDIS_URL", "http://h", "XAGENT_REDIS_URL: must be a redis://"),
        ("XAGENT_RUN_MAX_ATTEMPTS", "lots", "XAGENT_RUN_MAX_ATTEMPTS: Input should be a valid"),
        ("XAGENT_STREAM_IDLE_TIMEOUT_MS", "5", "XAGENT_STREAM_IDLE_TIMEOUT_MS: Input should be"),
        (
            "XAGENT_RUN_LEASE_SECONDS",
            "60",
            "XAGENT_RUN_LEASE_SECONDS: must be shorter than the stream idle timeout (60 s",
        ),
        ("XAGENT_HEARTBEAT_SECONDS", "20", "XAGENT_HEARTBEAT_SECONDS: must be at most half"),
        ("XAGENT_RUN_STUCK_SECONDS", "30", "XAGENT_RUN_STUCK_SECONDS: must be longer than"),
        ("XAGENT_SCHEDULER_LEASE_SECONDS", "0", "XAGENT_SCHEDULER_LEASE_SECONDS: Input should"),
        ("XAGENT_TICK_CRON", "* * *", "XAGENT_TICK_CRON: must be a 5-field cron"),
        # 0 would be SQLAlchemy's "no limit", not "no pool"
        ("XAGENT_DATABASE_POOL_SIZE", "0", "XAGENT_DATABASE_POOL_SIZE: Input should be greater"),
        ("XAGENT_DATABASE_POOL_SIZE", "many", "XAGENT_DATABASE_POOL_SIZE: Input should be a valid"),
        ("XAGENT_DATABASE_MAX_OVERFLOW", "-1", "XAGENT_DATABASE_MAX_OVERFLOW: Input should be"),
    ],
)
def test_malformed_setting_names_the_variable(
    env: pytest.MonkeyPatch, var: str, value: str, message: str
) -> None:
    env.setenv(var, value)
    with pytest.raises(SettingsError) as info:
        load_settings()
    text = str(info.value)
    assert message in text
    assert "\n" not in text


def test_missing_setting(env: pytest.MonkeyPatch) -> None:
    env.delenv("XAGENT_REDIS_URL")
    with pytest.raises(SettingsError, match=r"^XAGENT_REDIS_URL: required setting is missing$"):
        load_settings()


def test_secret_from_credentials_directory(env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    (tmp_path / "database_password").write_text("s3cret\n")
    (tmp_path / "redis_password").write_text("r3dis")
    env.setenv("CREDENTIALS_DIRECTORY", str(tmp_path))
    env.setenv("XAGENT_DATABASE_PASSWORD", "from-env")
    settings = load_settings()
    assert settings.sqlalchemy_url().password == "s3cret"
    assert settings.redis_kwargs() == {"password": "r3dis"}
    assert settings.root_password is None
    assert "s3cret" not in repr(settings)


def test_secret_from_environment_without_credentials(env: pytest.MonkeyPatch) -> None:
    env.setenv("XAGENT_ROOT_PASSWORD", "pw-from-env")
    settings = load_settings()
    assert settings.root_password is not None
    assert settings.root_password.get_secret_value() == "pw-from-env"
    assert settings.redis_kwargs() == {}


def test_web_app_import_fails_naming_the_variable(env: pytest.MonkeyPatch) -> None:
    import os
    import subprocess
    import sys

    child_env = {k: v for k, v in os.environ.items() if k != "XAGENT_DATABASE_URL"}
    result = subprocess.run(
        [sys.executable, "-c", "import xagent.main"],
        env=child_env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode != 0
    assert "XAGENT_DATABASE_URL: required setting is missing" in result.stderr.splitlines()[-1]


def test_a_bad_model_url_is_named_but_its_secrets_are_not(env: pytest.MonkeyPatch) -> None:
    # a token in the query or a password in the user part must not reach the journal
    bad = {"name": "x", "url": "ftp://u:pw-s3cret@h/x?t=tok-s3cret", "sha256": "1" * 64}
    env.setenv("XAGENT_MODELS", json.dumps([bad]))
    with pytest.raises(SettingsError) as invalid:
        load_settings()
    assert "XAGENT_MODELS" in str(invalid.value)
    assert "ftp://u:***@h/x?t=***" in str(invalid.value)
    assert "s3cret" not in str(invalid.value)
