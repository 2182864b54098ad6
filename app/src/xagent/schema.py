"""Schema revisions for expand/contract releases (what ``xagent-bootstrap schema`` prints and
what ``migrate`` records and checks).

A migration module may declare ``backward_compatible = True``: the schema after it still works
with the code of its ``down_revision`` (expand-only: new nullable columns, new tables, new
indexes; nothing dropped, renamed or made stricter). Missing means ``False``.

``migrate`` records every revision this code knows in ``xagent_schema_history`` (outside
Alembic, like ``alembic_version``). When the database is at a revision this code does not
know (a newer release migrated it, then the deploy rolled back), the recorded history says
whether this older code may run on it: only if every newer revision is backward-compatible.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from importlib.resources import files
from typing import Any

from sqlalchemy import (
    Boolean,
    Column,
    DateTime,
    MetaData,
    String,
    Table,
    Text,
    func,
    select,
    text,
)
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.ext.asyncio import AsyncConnection
from sqlalchemy.schema import CreateTable

# Tests point this at a copy of the migrations with extra revisions (a "newer release").
SCRIPT_LOCATION: str | None = None
HISTORY_TABLE = "xagent_schema_history"
RULE = (
    "older code may only run on a newer schema when every newer migration declares "
    "backward_compatible = True (expand-only; see app/README.md)"
)

# Not part of xagent.db.metadata: it belongs to the bootstrap, not to the app's schema.
history = Table(
    HISTORY_TABLE,
    MetaData(),
    Column("revision", String(64), primary_key=True),
    Column("down_revision", String(64), nullable=True),
    Column("backward_compatible", Boolean, nullable=False),
    Column("doc", Text, nullable=False, server_default=""),
    Column("recorded_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
)


class SchemaError(Exception):
    """The migrations or the database's schema history do not allow this; one-line cause."""


@dataclass(frozen=True)
class Revision:
    revision: str
    down_revision: str | None
    backward_compatible: bool
    doc: str


def script_location() -> str:
    return SCRIPT_LOCATION or str(files("xagent") / "migrations")


def _first_line(doc: str | None) -> str:
    lines = (doc or "").strip().splitlines()
    return lines[0].strip() if lines else ""


def load_revisions(location: str | None = None) -> list[Revision]:
    """This code's migrations, head first; raises :class:`SchemaError` unless the history is
    linear and every ``backward_compatible`` is a bool."""
    from alembic.config import Config
    from alembic.script import ScriptDirectory
    from alembic.util import CommandError

    cfg = Config()
    cfg.set_main_option("script_location", location or script_location())
    try:
        scripts = list(ScriptDirectory.from_config(cfg).walk_revisions())
    except CommandError as exc:
        raise SchemaError(f"migrations: {exc}") from None
    revisions: list[Revision] = []
    for script in scripts:
        down = script.down_revision
        if down is not None and not isinstance(down, str):
            raise SchemaError(f"migration {script.revision}: merge revisions are not supported")
        flag = getattr(script.module, "backward_compatible", False)
        if not isinstance(flag, bool):
            raise SchemaError(
                f"migration {script.revision}: backward_compatible must be True or False"
            )
        revisions.append(Revision(script.revision, down, flag, _first_line(script.module.__doc__)))
    # linear: each revision's parent is the next one, the last one is the base
    for newer, older in zip(revisions, [*revisions[1:], None], strict=True):
        expected = older.revision if older is not None else None
        if newer.down_revision != expected:
            raise SchemaError(
                f"migrations: history is not linear at {newer.revision} "
                f"(down_revision {newer.down_revision}, expected {expected})"
            )
    return revisions


def schema_document(revisions: Sequence[Revision]) -> dict[str, Any]:
    """What ``xagent-bootstrap schema`` prints: head first."""
    return {
        "head": revisions[0].revision if revisions else None,
        "revisions": [asdict(rev) for rev in revisions],
    }


async def record_history(conn: AsyncConnection, revisions: Sequence[Revision]) -> int:
    """Create the history table if needed and upsert ``revisions``; returns rows written.

    Rows that already hold the same values are not touched (a re-run writes nothing).
    """
    await conn.execute(CreateTable(history, if_not_exists=True))
    written = 0
    for rev in revisions:
        stmt = pg_insert(history).values(**asdict(rev))
        excluded = stmt.excluded
        stmt = stmt.on_conflict_do_update(
            index_elements=[history.c.revision],
            set_={
                "down_revision": excluded.down_revision,
                "backward_compatible": excluded.backward_compatible,
                "doc": excluded.doc,
                "recorded_at": func.now(),
            },
            where=(
                history.c.down_revision.is_distinct_from(excluded.down_revision)
                | history.c.backward_compatible.is_distinct_from(excluded.backward_compatible)
                | history.c.doc.is_distinct_from(excluded.doc)
            ),
        )
        written += (await conn.execute(stmt)).rowcount or 0
    return written


async def read_history(conn: AsyncConnection) -> dict[str, Revision]:
    """The recorded revisions (empty when the table does not exist)."""
    exists = (
        await conn.execute(text("SELECT to_regclass(:t) IS NOT NULL"), {"t": HISTORY_TABLE})
    ).scalar()
    if not exists:
        return {}
    rows = await conn.execute(
        select(
            history.c.revision,
            history.c.down_revision,
            history.c.backward_compatible,
            history.c.doc,
        )
    )
    return {row.revision: Revision(*row) for row in rows}


def check_ahead(
    db_revision: str, code: Sequence[Revision], recorded: Mapping[str, Revision]
) -> list[Revision]:
    """The database is at ``db_revision``, which this code does not know.

    Returns the recorded revisions between this code's head and the database (newest
    first) when all of them are backward-compatible; raises :class:`SchemaError` otherwise,
    or when the history does not lead from the database back to this code's head.
    """
    known = {rev.revision for rev in code}
    head = code[0].revision if code else None
    ahead = f"database at {db_revision} is ahead of this release (head {head})"
    chain: list[Revision] = []
    current: str | None = db_revision
    while current is not None and current not in known:
        rec = recorded.get(current)
        if rec is None:
            raise SchemaError(
                f"{ahead} and {current} is not recorded in {HISTORY_TABLE}: cannot tell "
                f"whether it is backward-compatible, refusing; {RULE}"
            )
        if len(chain) > len(recorded):  # a cycle in hand-edited rows
            raise SchemaError(f"{ahead} and {HISTORY_TABLE} has a cycle at {current}")
        chain.append(rec)
        current = rec.down_revision
    if current != head:
        joins = f"joins this release's history at {current}" if current else "shares none"
        raise SchemaError(
            f"database at {db_revision} is not a descendant of this release's head {head} "
            f"(its history {joins}): refusing to run this release on it"
        )
    bad = [rev.revision for rev in chain if not rev.backward_compatible]
    if bad:
        names = ", ".join(bad)
        verb = "is" if len(bad) == 1 else "are"
        raise SchemaError(f"{ahead} and {names} {verb} not backward-compatible: {RULE}")
    return chain


def ahead_message(db_revision: str, head: str | None, chain: Sequence[Revision]) -> str:
    names = ", ".join(rev.revision for rev in chain)
    verb = "is" if len(chain) == 1 else "are"
    return (
        f"database at {db_revision} is ahead of this release (head {head}); "
        f"{names} {verb} backward-compatible, nothing to do"
    )
