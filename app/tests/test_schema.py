"""Schema tracking for rollbacks (expand/contract): ``xagent-bootstrap schema``, the
``xagent_schema_history`` table, and ``migrate`` on a database a newer release migrated.

A "newer release" is a temp copy of the package's migrations with test-only revisions on top,
run by a bootstrap whose ``xagent.schema.SCRIPT_LOCATION`` points at the copy.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import subprocess
from importlib.resources import files
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import inspect
from sqlalchemy.ext.asyncio import create_async_engine

from conftest import BIN, base_env, run_bootstrap, sql
from xagent import schema
from xagent.schema import Revision

NEWER = (
    "import sys, xagent.schema as s; s.SCRIPT_LOCATION = sys.argv[1]; "
    "from xagent.bootstrap import main; sys.exit(main(sys.argv[2:]))"
)

TEMPLATE = '''"""Test-only revision {rev}: {doc}

Revision ID: {rev}
Revises: {parent}
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "{rev}"
down_revision: str | None = "{parent}"
branch_labels: str | None = None
depends_on: str | None = None
{flag}

def upgrade() -> None:
    {body}


def downgrade() -> None:
    pass
'''

EXPAND = 'op.add_column("runs", sa.Column("note_{rev}", sa.Text, nullable=True))'
CONTRACT = 'op.drop_column("runs", "worker_pid")'


def _head() -> str:
    return schema.load_revisions()[0].revision


def newer_release(tmp_path: Path, *extra: tuple[str, bool | None, str]) -> str:
    """A copy of the migrations plus ``(revision, backward_compatible, upgrade body)``
    revisions on top (flag ``None``: not declared)."""
    dst = tmp_path / "newer-migrations"
    shutil.copytree(
        str(files("xagent") / "migrations"), dst, ignore=shutil.ignore_patterns("__pycache__")
    )
    parent = _head()
    for rev, flag, body in extra:
        text = TEMPLATE.format(
            rev=rev,
            parent=parent,
            doc="expand" if body == EXPAND else "contract",
            flag="" if flag is None else f"backward_compatible = {flag}\n",
            body=body.format(rev=rev),
        )
        (dst / "versions" / f"{rev}_test_only.py").write_text(text)
        parent = rev
    return str(dst)


def run_newer(env: dict[str, str], location: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / "python"), "-c", NEWER, location, *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def _history(db_url: str) -> list[dict[str, Any]]:
    return [
        dict(r)
        for r in sql(
            db_url,
            "SELECT revision, down_revision, backward_compatible, doc, recorded_at "
            "FROM xagent_schema_history ORDER BY revision",
        )
    ]


def _version(db_url: str) -> str:
    return str(sql(db_url, "SELECT version_num FROM alembic_version")[0]["version_num"])


def _one_line_error(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 1, result.stdout + result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("xagent-bootstrap: error: ")
    return line


# -- xagent-bootstrap schema -------------------------------------------------------------


def test_schema_command_needs_no_settings_and_no_database(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("XAGENT_")}
    env.pop("CREDENTIALS_DIRECTORY", None)
    result = subprocess.run(
        [str(BIN / "xagent-bootstrap"), "schema"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    doc = json.loads(result.stdout)
    revisions = doc["revisions"]
    assert doc["head"] == revisions[0]["revision"] == _head()  # head first
    assert all(
        set(r) == {"revision", "down_revision", "backward_compatible", "doc"} for r in revisions
    )
    for newer, older in itertools.pairwise(revisions):
        assert newer["down_revision"] == older["revision"]
    assert revisions[-1]["down_revision"] is None
    by_rev = {r["revision"]: r for r in revisions}
    assert by_rev["0001"]["backward_compatible"] is False
    assert by_rev["0001"]["doc"].startswith("Initial schema")
    assert by_rev["0002"]["backward_compatible"] is True  # two nullable columns
    assert all(isinstance(r["backward_compatible"], bool) and r["doc"] for r in revisions)


def test_schema_is_a_command_of_its_own(tmp_path: Path) -> None:
    env = base_env("postgresql+asyncpg://x@127.0.0.1/x", "q", tmp_path)
    line = _one_line_error(run_bootstrap(env, "schema", "migrate"))
    assert "schema is a command of its own" in line


def test_schema_of_a_newer_release(tmp_path: Path) -> None:
    location = newer_release(tmp_path, ("9001", True, EXPAND), ("9002", None, CONTRACT))
    env = {k: v for k, v in os.environ.items() if not k.startswith("XAGENT_")}
    result = run_newer(env, location, "schema")
    assert result.returncode == 0, result.stderr
    doc = json.loads(result.stdout)
    assert doc["head"] == "9002"
    assert doc["revisions"][:3] == [
        {
            "revision": "9002",
            "down_revision": "9001",
            "backward_compatible": False,  # not declared: not compatible
            "doc": "Test-only revision 9002: contract",
        },
        {
            "revision": "9001",
            "down_revision": _head(),
            "backward_compatible": True,
            "doc": "Test-only revision 9001: expand",
        },
        {**doc["revisions"][2], "revision": _head()},
    ]


def test_schema_rejects_a_flag_that_is_not_a_bool(tmp_path: Path) -> None:
    location = newer_release(tmp_path, ("9001", True, EXPAND))
    path = Path(location) / "versions" / "9001_test_only.py"
    path.write_text(
        path.read_text().replace("backward_compatible = True", 'backward_compatible = "yes"')
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("XAGENT_")}
    line = _one_line_error(run_newer(env, location, "schema"))
    assert "migration 9001: backward_compatible must be True or False" in line


# -- the history table ---------------------------------------------------------------------


def test_migrate_records_the_history(fresh_db: str, tmp_path: Path) -> None:
    env = base_env(fresh_db, "q", tmp_path / "models")
    first = run_bootstrap(env, "migrate")
    assert first.returncode == 0, first.stderr
    code = schema.load_revisions()
    assert f"migrate: recorded {len(code)} revision(s) in xagent_schema_history" in first.stdout
    rows = _history(fresh_db)
    assert [
        Revision(r["revision"], r["down_revision"], r["backward_compatible"], r["doc"])
        for r in rows
    ] == sorted(code, key=lambda r: r.revision)

    second = run_bootstrap(env, "all")
    assert second.returncode == 0, second.stderr
    assert "migrate: schema at" in second.stdout
    assert "recorded" not in second.stdout
    assert _history(fresh_db) == rows  # untouched, recorded_at included


def test_history_is_recorded_for_a_database_from_before_the_table(
    fresh_db: str, tmp_path: Path
) -> None:
    """A database migrated by a release that did not record history yet."""
    env = base_env(fresh_db, "q", tmp_path / "models")
    assert run_bootstrap(env, "migrate").returncode == 0
    sql(fresh_db, "DROP TABLE xagent_schema_history")
    result = run_bootstrap(env, "migrate")
    assert result.returncode == 0, result.stderr
    assert f"migrate: schema at {_head()}, nothing to do" in result.stdout
    assert "migrate: recorded" in result.stdout
    assert len(_history(fresh_db)) == len(schema.load_revisions())


# -- rollback: the database is ahead of this release ---------------------------------------


def test_rollback_onto_backward_compatible_revisions_is_allowed(
    fresh_db: str, tmp_path: Path
) -> None:
    env = base_env(fresh_db, "q", tmp_path / "models")
    location = newer_release(tmp_path, ("9001", True, EXPAND), ("9002", True, EXPAND))
    newer = run_newer(env, location, "all")
    assert newer.returncode == 0, newer.stderr
    assert _version(fresh_db) == "9002"
    history = _history(fresh_db)
    assert {r["revision"]: r["backward_compatible"] for r in history}["9002"] is True

    # the older release (this package) starts on the newer schema: boot or rollback
    for _ in range(2):  # and again: a boot after the rollback finds the same
        older = run_bootstrap(env, "all")
        assert older.returncode == 0, older.stderr
        assert (
            f"migrate: database at 9002 is ahead of this release (head {_head()}); "
            "9002, 9001 are backward-compatible, nothing to do"
        ) in older.stdout
    assert _version(fresh_db) == "9002"
    assert _history(fresh_db) == history  # the older release does not rewrite it
    runs = sql(fresh_db, "SELECT ok FROM bootstrap_runs ORDER BY id")
    assert [r["ok"] for r in runs] == [True, True, True]

    # rolling forward again is a normal no-op migrate
    again = run_newer(env, location, "migrate")
    assert again.returncode == 0, again.stderr
    assert "migrate: schema at 9002, nothing to do" in again.stdout


def test_rollback_past_a_non_backward_compatible_revision_is_refused(
    fresh_db: str, tmp_path: Path
) -> None:
    env = base_env(fresh_db, "q", tmp_path / "models")
    location = newer_release(tmp_path, ("9001", True, EXPAND), ("9002", None, CONTRACT))
    newer = run_newer(env, location, "all")
    assert newer.returncode == 0, newer.stderr

    line = _one_line_error(run_bootstrap(env, "all"))
    assert line == (
        f"xagent-bootstrap: error: migrate: database at 9002 is ahead of this release "
        f"(head {_head()}) and 9002 is not backward-compatible: {schema.RULE}"
    )
    assert _version(fresh_db) == "9002"  # nothing touched
    last = sql(fresh_db, "SELECT ok, error FROM bootstrap_runs ORDER BY id DESC LIMIT 1")[0]
    assert last["ok"] is False
    assert "9002 is not backward-compatible" in str(last["error"])


def test_database_at_an_unrecorded_revision_is_refused(fresh_db: str, tmp_path: Path) -> None:
    env = base_env(fresh_db, "q", tmp_path / "models")
    assert run_bootstrap(env, "migrate").returncode == 0
    sql(fresh_db, "UPDATE alembic_version SET version_num = 'f00d'")
    line = _one_line_error(run_bootstrap(env, "migrate"))
    assert "database at f00d is ahead of this release" in line
    assert "f00d is not recorded in xagent_schema_history" in line


def test_diverged_history_is_refused(fresh_db: str, tmp_path: Path) -> None:
    """The database's newer revision does not descend from this release's head."""
    env = base_env(fresh_db, "q", tmp_path / "models")
    assert run_bootstrap(env, "migrate").returncode == 0
    sql(
        fresh_db,
        "INSERT INTO xagent_schema_history (revision, down_revision, backward_compatible) "
        "VALUES ('9001', '0001', true)",
    )
    sql(fresh_db, "UPDATE alembic_version SET version_num = '9001'")
    line = _one_line_error(run_bootstrap(env, "migrate"))
    assert f"database at 9001 is not a descendant of this release's head {_head()}" in line
    assert "joins this release's history at 0001" in line


def _rev(rev: str, down: str | None, bc: bool) -> Revision:
    return Revision(rev, down, bc, "")


@pytest.mark.parametrize(
    ("recorded", "error"),
    [
        ({"3": _rev("3", "2", True)}, None),
        ({"3": _rev("3", "2", False)}, "3 is not backward-compatible"),
        ({"4": _rev("4", "3", True), "3": _rev("3", "2", False)}, "3 is not backward-compatible"),
        (
            {"4": _rev("4", "3", False), "3": _rev("3", "2", False)},
            "4, 3 are not backward-compatible",
        ),
        ({"4": _rev("4", "3", True)}, "3 is not recorded"),
        ({"4": _rev("4", "x", True), "x": _rev("x", "4", True)}, "has a cycle"),
        ({"4": _rev("4", None, True)}, "its history shares none"),
    ],
)
def test_check_ahead(recorded: dict[str, Revision], error: str | None) -> None:
    code = [_rev("2", "1", True), _rev("1", None, False)]
    db_rev = "4" if "4" in recorded else "3"
    if error is None:
        assert schema.check_ahead(db_rev, code, recorded) == [recorded["3"]]
    else:
        with pytest.raises(schema.SchemaError, match=error):
            schema.check_ahead(db_rev, code, recorded)


# -- the flags are honest --------------------------------------------------------------------


def _snapshot(sync_conn: Any) -> dict[str, dict[str, tuple[str, bool, bool]]]:
    inspector = inspect(sync_conn)
    return {
        table: {
            col["name"]: (str(col["type"]), bool(col["nullable"]), col["default"] is not None)
            for col in inspector.get_columns(table)
        }
        for table in inspector.get_table_names()
        if table != "alembic_version"
    }


def _upgrade_to(sync_conn: Any, revision: str) -> None:
    from alembic import command
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", schema.script_location())
    cfg.attributes["connection"] = sync_conn
    command.upgrade(cfg, revision)


async def _expand_only_violations(db_url: str) -> list[str]:
    """Migrate ``db_url`` step by step; what each revision marked backward_compatible does
    that older code could trip over (tables or columns dropped, types changed, columns made
    NOT NULL, NOT NULL columns added without a default)."""
    problems: list[str] = []
    engine = create_async_engine(db_url)
    try:
        async with engine.connect() as conn:
            for rev in reversed(schema.load_revisions()):  # base first
                before = await conn.run_sync(_snapshot)
                await conn.run_sync(_upgrade_to, rev.revision)
                await conn.commit()
                after = await conn.run_sync(_snapshot)
                if not rev.backward_compatible:
                    continue
                for table, columns in before.items():
                    if table not in after:
                        problems.append(f"{rev.revision} drops table {table}")
                        continue
                    for name, (type_, nullable, _default) in columns.items():
                        if name not in after[table]:
                            problems.append(f"{rev.revision} drops {table}.{name}")
                        elif after[table][name][0] != type_:
                            problems.append(f"{rev.revision} changes the type of {table}.{name}")
                        elif nullable and not after[table][name][1]:
                            problems.append(f"{rev.revision} makes {table}.{name} NOT NULL")
                    for name, (_, nullable, default) in after[table].items():
                        if name not in columns and not (nullable or default):
                            problems.append(
                                f"{rev.revision} adds NOT NULL {table}.{name} without a default"
                            )
    finally:
        await engine.dispose()
    return problems


async def test_backward_compatible_migrations_only_expand(fresh_db: str) -> None:
    """The package's flags: every migration marked backward_compatible only expands. This
    checks the mechanical part of the rule; the flag stays the author's judgement."""
    assert await _expand_only_violations(fresh_db) == []


async def test_the_expand_check_catches_a_wrong_flag(
    fresh_db: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    location = newer_release(tmp_path, ("9001", True, EXPAND), ("9002", True, CONTRACT))
    monkeypatch.setattr(schema, "SCRIPT_LOCATION", location)
    assert await _expand_only_violations(fresh_db) == ["9002 drops runs.worker_pid"]
