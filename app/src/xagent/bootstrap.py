"""One-time work, run before the web and receiver units: ``xagent-bootstrap STEP...``.

Steps: ``migrate`` (Alembic), ``models`` (host-local downloads), ``tools`` (registry upsert),
``root-user`` (admin account), ``all`` (= all four, in that order). Every step is idempotent.
Cluster-wide steps (migrate, tools, root-user) hold a PostgreSQL advisory lock, so bootstraps
started on several hosts at once run them one after another. Before the first of them the
command waits for PostgreSQL (up to ``XAGENT_BOOTSTRAP_WAIT_SECONDS``). Each invocation records
one ``bootstrap_runs`` row. On failure the command exits non-zero with a one-line cause on
stderr.

``xagent-bootstrap schema`` prints this code's migrations as JSON (no settings, no database);
see :mod:`xagent.schema`.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import hashlib
import hmac
import json
import os
import secrets
import sys
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Text, cast, func, insert, inspect, select, text, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from xagent import db, models, pgwait, schema
from xagent.settings import Settings, SettingsError, load_settings
from xagent.tools import REGISTRY

STEPS = ("migrate", "models", "tools", "root-user")
CLUSTER_STEPS = {"migrate", "tools", "root-user"}
# pg_advisory_lock key shared by every cluster-wide step ("xagentbs" as a 63-bit integer)
ADVISORY_LOCK_KEY = int.from_bytes(b"xagentbs", "big") & 0x7FFFFFFFFFFFFFFF

# scrypt parameters (RFC 7914); stored with the hash so they can change later
SCRYPT_N, SCRYPT_R, SCRYPT_P = 2**15, 8, 1


class BootstrapError(Exception):
    """A step failed; the message is the one-line cause."""


def say(message: str) -> None:
    print(message, flush=True)


# -- password hashing ---------------------------------------------------------------------


def hash_password(password: str) -> str:
    """Salted scrypt hash: ``scrypt$N$r$p$salt_b64$hash_b64``."""
    salt = secrets.token_bytes(16)
    digest = hashlib.scrypt(
        password.encode(), salt=salt, n=SCRYPT_N, r=SCRYPT_R, p=SCRYPT_P, maxmem=64 * 2**20
    )
    b64 = base64.b64encode
    return f"scrypt${SCRYPT_N}${SCRYPT_R}${SCRYPT_P}${b64(salt).decode()}${b64(digest).decode()}"


def verify_password(password: str, stored: str) -> bool:
    try:
        kind, n, r, p, salt_b64, hash_b64 = stored.split("$")
        if kind != "scrypt":
            return False
        expected = base64.b64decode(hash_b64)
        digest = hashlib.scrypt(
            password.encode(),
            salt=base64.b64decode(salt_b64),
            n=int(n),
            r=int(r),
            p=int(p),
            maxmem=64 * 2**20,
            dklen=len(expected),
        )
    except (ValueError, TypeError):
        return False
    return hmac.compare_digest(digest, expected)


# -- helpers ------------------------------------------------------------------------------


@asynccontextmanager
async def cluster_lock(engine: AsyncEngine) -> AsyncIterator[AsyncConnection]:
    """A connection holding the cluster-wide advisory lock (released on exit)."""
    async with engine.connect() as conn:
        started = time.monotonic()
        got = (
            await conn.execute(text("SELECT pg_try_advisory_lock(:k)"), {"k": ADVISORY_LOCK_KEY})
        ).scalar()
        if not got:
            say("waiting for the cluster bootstrap lock (another host is bootstrapping)")
            await conn.execute(text("SELECT pg_advisory_lock(:k)"), {"k": ADVISORY_LOCK_KEY})
            say(f"got the cluster bootstrap lock after {time.monotonic() - started:.1f} s")
        await conn.commit()
        try:
            yield conn
        finally:
            if conn.in_transaction():
                await conn.rollback()
            await conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": ADVISORY_LOCK_KEY})
            await conn.commit()


def _alembic_upgrade(sync_conn: Any, lock_timeout_ms: int) -> None:
    from alembic import command
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", schema.script_location())
    cfg.attributes["connection"] = sync_conn
    # session-wide, so it covers each revision's transaction and xagent.ddl's autocommit part
    sync_conn.exec_driver_sql(f"SET lock_timeout = {int(lock_timeout_ms)}")
    sync_conn.commit()  # out of any transaction: Alembic then begins one per revision
    try:
        command.upgrade(cfg, "head")
    finally:
        if sync_conn.in_transaction():
            sync_conn.rollback()
        sync_conn.exec_driver_sql("RESET lock_timeout")
        sync_conn.commit()


def _current_revision(sync_conn: Any) -> str | None:
    from alembic.migration import MigrationContext

    rev: str | None = MigrationContext.configure(sync_conn).get_current_revision()
    return rev


def _lock_not_available(exc: BaseException) -> bool:
    """PostgreSQL gave up waiting for a lock (SQLSTATE 55P03: lock_timeout)."""
    orig = getattr(exc, "orig", None)
    return getattr(orig, "sqlstate", None) == "55P03" or getattr(orig, "pgcode", None) == "55P03"


async def _upgrade_with_retries(conn: AsyncConnection, settings: Settings) -> None:
    """Alembic upgrade to head; a revision that hit ``lock_timeout`` is retried (the ones
    before it stay committed)."""
    timeout_ms = settings.migrate_lock_timeout_ms
    retries = settings.migrate_lock_retries
    for attempt in range(retries + 1):
        try:
            await conn.run_sync(_alembic_upgrade, timeout_ms)
            return
        except Exception as exc:
            if not _lock_not_available(exc):
                raise
            at = await conn.run_sync(_current_revision)
            await conn.commit()
            if attempt == retries:
                raise BootstrapError(
                    f"migrate: the revision after {at} did not get its lock within "
                    f"{timeout_ms} ms in {retries + 1} tries (XAGENT_MIGRATE_LOCK_TIMEOUT_MS, "
                    "XAGENT_MIGRATE_LOCK_RETRIES): a long transaction holds the table "
                    "(see pg_stat_activity)"
                ) from None
            pause = min(0.5 * 2**attempt, 10.0)
            say(
                f"migrate: the revision after {at} gave up waiting {timeout_ms} ms for a lock "
                f"(queries on the table would queue behind it); try {attempt + 2} of "
                f"{retries + 1} in {pause:g} s"
            )
            await asyncio.sleep(pause)


async def step_migrate(engine: AsyncEngine, settings: Settings) -> None:
    try:
        code = schema.load_revisions()
    except schema.SchemaError as exc:
        raise BootstrapError(f"migrate: {exc}") from None
    head = code[0].revision if code else None
    async with cluster_lock(engine) as conn:
        before = await conn.run_sync(_current_revision)
        if before is not None and before not in {rev.revision for rev in code}:
            # A newer release migrated the database (this is a rollback): Alembic cannot
            # even locate that revision; the recorded history says if this code may run.
            recorded = await schema.read_history(conn)
            await conn.commit()
            try:
                chain = schema.check_ahead(before, code, recorded)
            except schema.SchemaError as exc:
                raise BootstrapError(f"migrate: {exc}") from None
            # and no history written: the newer release's rows know more than this code
            say(f"migrate: {schema.ahead_message(before, head, chain)}")
            return
        # recorded before any revision is applied: an applied revision is always recorded
        # (each revision commits on its own)
        recorded_rows = await schema.record_history(conn, code)
        await conn.commit()
        await _upgrade_with_retries(conn, settings)
        after = await conn.run_sync(_current_revision)
        await conn.commit()
    if before == after:
        say(f"migrate: schema at {after}, nothing to do")
    else:
        say(f"migrate: schema upgraded {before} -> {after}")
    if recorded_rows:
        say(f"migrate: recorded {recorded_rows} revision(s) in {schema.HISTORY_TABLE}")


async def wait_for_database(engine: AsyncEngine, settings: Settings, step: str) -> None:
    """Before the first step that needs PostgreSQL (at boot it may not be up yet)."""
    try:
        await pgwait.wait_for_database(engine, settings.bootstrap_wait_seconds, out=say)
    except pgwait.DatabaseUnavailable as exc:
        raise BootstrapError(f"{step}: {exc}") from None


async def step_models(settings: Settings) -> None:
    if not settings.models:
        say("models: none configured")
        return
    try:
        results = await asyncio.to_thread(models.ensure_all, settings, out=say)
    except models.ModelError as exc:
        raise BootstrapError(f"models: {exc}") from None
    summary = ", ".join(f"{name} {state}" for name, state in results.items())
    say(f"models: {summary}")


async def step_tools(engine: AsyncEngine, settings: Settings) -> None:
    async with cluster_lock(engine) as conn:
        changed = 0
        for item in REGISTRY.values():
            row = item.row()
            stmt = pg_insert(db.tools).values(**row, active=True)
            excluded = stmt.excluded
            stmt = stmt.on_conflict_do_update(
                index_elements=[db.tools.c.name],
                set_={
                    "description": excluded.description,
                    "schema": excluded.schema,
                    "version": excluded.version,
                    "active": True,
                    "updated_at": func.now(),
                },
                # only touch rows that differ, so a re-run leaves them byte-identical
                where=(
                    db.tools.c.description.is_distinct_from(excluded.description)
                    | (cast(db.tools.c.schema, Text) != cast(excluded.schema, Text))
                    | db.tools.c.version.is_distinct_from(excluded.version)
                    | db.tools.c.active.is_(False)
                ),
            )
            result = await conn.execute(stmt)
            changed += result.rowcount or 0
        retired = await conn.execute(
            update(db.tools)
            .where(db.tools.c.name.not_in(list(REGISTRY)), db.tools.c.active.is_(True))
            .values(active=False, updated_at=func.now())
        )
        await conn.commit()
    say(f"tools: {len(REGISTRY)} in code, {changed} inserted/updated, {retired.rowcount} retired")


def _root_password(settings: Settings) -> str:
    if settings.root_password is None:
        raise BootstrapError(
            "root-user: no password: provide the credential root_password "
            "($CREDENTIALS_DIRECTORY/root_password) or XAGENT_ROOT_PASSWORD"
        )
    password = settings.root_password.get_secret_value()
    if len(password) < 8:
        raise BootstrapError("root-user: root_password is shorter than 8 characters")
    return password


async def step_root_user(engine: AsyncEngine, settings: Settings) -> None:
    """Create the admin account, or give it the configured password when that changed: the
    configured root_password is the one that works (rotating it is a deploy)."""
    password = _root_password(settings)
    async with cluster_lock(engine) as conn:
        row = (
            await conn.execute(
                select(db.users.c.id, db.users.c.password_hash).where(
                    db.users.c.username == settings.root_username
                )
            )
        ).first()
        if row is not None and await asyncio.to_thread(
            verify_password, password, row.password_hash
        ):
            await conn.commit()
            say(f"root-user: {settings.root_username!r} exists, nothing to do")
            return
        password_hash = await asyncio.to_thread(hash_password, password)
        if row is not None:
            await conn.execute(
                update(db.users).where(db.users.c.id == row.id).values(password_hash=password_hash)
            )
            await conn.commit()
            say(f"root-user: {settings.root_username!r} exists, password set to root_password")
            return
        await conn.execute(
            pg_insert(db.users)
            .values(username=settings.root_username, password_hash=password_hash, is_admin=True)
            .on_conflict_do_nothing(index_elements=[db.users.c.username])
        )
        await conn.commit()
    say(f"root-user: created {settings.root_username!r}")


# -- run bookkeeping ----------------------------------------------------------------------


async def _has_runs_table(engine: AsyncEngine) -> bool:
    async with engine.connect() as conn:
        return bool(await conn.run_sync(lambda c: inspect(c).has_table(db.bootstrap_runs.name)))


async def _record_start(
    engine: AsyncEngine, settings: Settings, steps: str, started: datetime
) -> int:
    async with engine.begin() as conn:
        run_id = (
            await conn.execute(
                insert(db.bootstrap_runs)
                .values(host=settings.host_name, pid=os.getpid(), steps=steps, started_at=started)
                .returning(db.bootstrap_runs.c.id)
            )
        ).scalar_one()
    return int(run_id)


async def _record_end(engine: AsyncEngine, run_id: int, error: str | None) -> None:
    async with engine.begin() as conn:
        await conn.execute(
            update(db.bootstrap_runs)
            .where(db.bootstrap_runs.c.id == run_id)
            .values(finished_at=datetime.now(UTC), ok=error is None, error=error)
        )


def _one_line(exc: BaseException) -> str:
    text_ = str(exc).strip().splitlines()
    detail = text_[0] if text_ else ""
    return f"{type(exc).__name__}: {detail}" if detail else type(exc).__name__


async def run_steps(settings: Settings, steps: Sequence[str]) -> None:
    started = datetime.now(UTC)
    label = ",".join(steps)
    engine = db.make_engine(settings)
    run_id: int | None = None
    database_seen = False
    database_failed = False  # waited in vain: recording the failure would only wait again
    try:
        for step in steps:
            t0 = time.monotonic()
            say(f"step {step}: start")
            try:
                if step in CLUSTER_STEPS and not database_seen:
                    database_failed = True
                    await wait_for_database(engine, settings, step)
                    database_seen, database_failed = True, False
                if step == "migrate":
                    await step_migrate(engine, settings)
                elif step == "models":
                    await step_models(settings)
                elif step == "tools":
                    await step_tools(engine, settings)
                elif step == "root-user":
                    await step_root_user(engine, settings)
                if run_id is None and step in CLUSTER_STEPS:
                    run_id = await _record_start(engine, settings, label, started)
            except BootstrapError:
                raise
            except Exception as exc:
                raise BootstrapError(f"{step}: {_one_line(exc)}") from exc
            say(f"step {step}: ok ({time.monotonic() - t0:.1f} s)")
        if run_id is None:
            try:
                if await _has_runs_table(engine):
                    run_id = await _record_start(engine, settings, label, started)
            except Exception as exc:
                say(f"warning: could not record this run in bootstrap_runs ({_one_line(exc)})")
        if run_id is not None:
            await _record_end(engine, run_id, None)
    except BootstrapError as exc:
        if run_id is None and not database_failed:
            try:
                if await _has_runs_table(engine):
                    run_id = await _record_start(engine, settings, label, started)
            except Exception:  # noqa: S110 - recording is best effort on failure
                pass
        if run_id is not None:
            with contextlib.suppress(Exception):
                await _record_end(engine, run_id, str(exc))
        raise
    finally:
        await engine.dispose()


def parse_steps(names: Sequence[str]) -> list[str]:
    chosen: set[str] = set()
    for name in names:
        if name == "all":
            chosen.update(STEPS)
        elif name in STEPS:
            chosen.add(name)
        else:
            raise BootstrapError(f"unknown step {name!r} (choose from all, {', '.join(STEPS)})")
    return [step for step in STEPS if step in chosen]


def print_schema() -> int:
    """``xagent-bootstrap schema``: this code's migrations as JSON, head first (no settings,
    no database: the deploy runs it on every installed release)."""
    try:
        revisions = schema.load_revisions()
    except schema.SchemaError as exc:
        print(f"xagent-bootstrap: error: schema: {exc}", file=sys.stderr, flush=True)
        return 1
    print(json.dumps(schema.schema_document(revisions), indent=2), flush=True)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="xagent-bootstrap",
        description="One-time setup before the xagent services start (idempotent).",
        epilog="`xagent-bootstrap schema` prints the migrations as JSON (head first) and exits.",
    )
    parser.add_argument(
        "steps",
        nargs="*",
        default=["all"],
        metavar="STEP",
        help=f"all (default) or any of: {', '.join(STEPS)}; or schema alone",
    )
    parser.add_argument(
        "--check-config",
        action="store_true",
        help="only validate the settings (and credential files), then exit 0 or 1",
    )
    args = parser.parse_args(argv)
    if "schema" in args.steps:
        if args.steps != ["schema"] or args.check_config:
            print(
                "xagent-bootstrap: error: schema is a command of its own, not a step",
                file=sys.stderr,
                flush=True,
            )
            return 1
        return print_schema()
    if args.check_config:
        try:
            load_settings()
        except SettingsError as exc:
            print(f"xagent-bootstrap: error: {exc}", file=sys.stderr, flush=True)
            return 1
        say("settings ok")
        return 0
    try:
        steps = parse_steps(args.steps)
        settings = load_settings()
        t0 = time.monotonic()
        asyncio.run(run_steps(settings, steps))
    except (BootstrapError, SettingsError) as exc:
        print(f"xagent-bootstrap: error: {exc}", file=sys.stderr, flush=True)
        return 1
    except KeyboardInterrupt:
        print("xagent-bootstrap: error: interrupted", file=sys.stderr, flush=True)
        return 130
    say(f"bootstrap done: {','.join(steps)} ({time.monotonic() - t0:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
