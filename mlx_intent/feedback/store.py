"""The feedback store: one SQLite database under the models home, with the results a correction can refer to
and the corrections themselves.

Every result of the chain carries an ``id`` (``results.new_id``: 128 random bits, uuid4 hex).  The store is
``<models home>/feedback.db``, stdlib ``sqlite3`` in WAL mode (readers never block the writer), ``busy_timeout``
for the other processes (``mlx-intent feedback add`` while ``serve`` runs), ``synchronous=FULL`` and one
transaction per write, so a write that returned is on disk and a kill -9 loses nothing committed.  A version
table drives migrations.

Results are recorded at classify time, and only where the user asked for it: ``mlx-intent serve`` records
by default (feedback is what its ``/v1/feedback`` route is for; ``--no-record`` turns it off),
``mlx-intent classify`` only with ``--record``, the Python API when a store is attached
(``build_chain(settings, store=open_store(home))``).  The store is self-contained (a correction joins its
result by id in one indexed lookup), while the JSONL classification log (``MLX_INTENT_LOG``) carries the same
``id`` on every line, so log and store join on it too.  Travellers' texts are personal: the database file is created
owner-only (0600; SQLite gives its -wal and -shm files the same mode) and nothing leaves the machine.

The rows have room for ``user`` (per-user thresholds: ``users``) and ``context`` (the earlier turns of a
conversation, JSON), and a result's ``context_used`` flag feeds the active-learning queue (``data.queue``).
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import threading
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from mlx_intent.errors import UserError
from mlx_intent.results import DISAGREEING, FeedbackError, top_gap
from mlx_intent.schema import INTENTS, MAX_INTENTS, SchemaError, validate

log = logging.getLogger("mlx_intent.feedback")

DB_NAME = "feedback.db"
BUSY_TIMEOUT_MS = 10_000
# The server's: an answer must not wait on a store another process holds; past this its record is lost, counted.
SERVE_BUSY_TIMEOUT_MS = 250

# One entry per schema version: the statements that bring version n - 1 to n.
MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (
        """CREATE TABLE results (
            id TEXT PRIMARY KEY,
            ts TEXT NOT NULL,
            user TEXT,
            text TEXT NOT NULL,
            context TEXT,
            lang TEXT,
            primary_intent TEXT NOT NULL,
            confidence REAL NOT NULL,
            all_intents TEXT NOT NULL,
            tier TEXT,
            model TEXT,
            margin REAL NOT NULL,
            disagreement INTEGER NOT NULL DEFAULT 0,
            context_used INTEGER NOT NULL DEFAULT 0,
            result TEXT NOT NULL
        )""",
        # seq grows with every write, a replacement included: "N new records" counts it.
        """CREATE TABLE feedback (
            seq INTEGER PRIMARY KEY AUTOINCREMENT,
            id TEXT NOT NULL UNIQUE REFERENCES results (id),
            ts TEXT NOT NULL,
            user TEXT,
            source TEXT NOT NULL,
            correct INTEGER NOT NULL,
            primary_intent TEXT NOT NULL,
            all_intents TEXT NOT NULL
        )""",
        "CREATE INDEX results_ts ON results (ts)",
    ),
    (
        # Per-user thresholds (NULL: the settings' value); learned_from counts the records a learn fitted them on.
        """CREATE TABLE users (
            id TEXT PRIMARY KEY,
            min_confidence REAL,
            margin REAL,
            learned_from INTEGER,
            updated TEXT NOT NULL
        )""",
        "CREATE INDEX results_user ON results (user)",
    ),
)
SCHEMA_VERSION = len(MIGRATIONS)


class UnknownResult(FeedbackError):
    status = 404


class DuplicateFeedback(FeedbackError):
    status = 409


class StoreError(UserError):
    """The database cannot be opened or used: a corrupt file, a newer schema, a read-only folder."""


def db_path(home: Path) -> Path:

    return home / DB_NAME


class Store:
    """One connection to the database, shared by the threads of a process under a lock; a thread waits at most
    ``busy_timeout_ms`` for that lock, and SQLite as long for another process's, then gets a StoreError."""

    def __init__(self, path: Path, busy_timeout_ms: int = BUSY_TIMEOUT_MS) -> None:
        self.path = path
        self.lock = threading.RLock()
        self.busy_timeout_ms = busy_timeout_ms
        self.lost = 0  # results that could not be recorded (record_results): their answers were given
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            os.close(os.open(path, os.O_RDWR | os.O_CREAT, 0o600))  # owner-only before SQLite creates anything
        except OSError as e:
            raise StoreError(f"cannot open the feedback store {path}: {e.strerror or e}") from None
        try:
            os.chmod(path, 0o600)
        except PermissionError:  # someone else's file: theirs to protect
            pass
        try:
            self.conn = sqlite3.connect(
                path, timeout=busy_timeout_ms / 1000, isolation_level=None, check_same_thread=False
            )
            self.conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout_ms)}")
            self.conn.execute("PRAGMA journal_mode = WAL")
            self.conn.execute("PRAGMA synchronous = FULL")
            self.conn.execute("PRAGMA foreign_keys = ON")
            self._migrate()
        except sqlite3.Error as e:
            raise StoreError(f"{path}: {e}") from None

    @contextmanager
    def _locked(self) -> Iterator[None]:
        """The connection's lock, waited for at most the busy timeout: threads queued behind a write that waits
        on another process must not each wait that long in turn."""
        if not self.lock.acquire(timeout=self.busy_timeout_ms / 1000):
            raise StoreError(f"{self.path}: busy (held by another thread past {self.busy_timeout_ms} ms)")
        try:
            yield
        finally:
            self.lock.release()

    @contextmanager
    def write(self) -> Iterator[sqlite3.Connection]:
        """One transaction, holding the write lock from its start (BEGIN IMMEDIATE): what it reads stays true
        until it commits, in this process and every other."""
        with self._locked():
            try:
                self.conn.execute("BEGIN IMMEDIATE")
                try:
                    yield self.conn
                    self.conn.execute("COMMIT")
                except BaseException:
                    if self.conn.in_transaction:
                        self.conn.execute("ROLLBACK")
                    raise
            except sqlite3.Error as e:  # locked past the busy timeout, a full disk, a corrupt page
                raise StoreError(f"{self.path}: {e}") from None

    def read(self, sql: str, args: Iterable[Any] = ()) -> list[dict[str, Any]]:
        with self._locked():
            try:
                cursor = self.conn.execute(sql, tuple(args))
                names = [d[0] for d in cursor.description]
                return [dict(zip(names, row)) for row in cursor.fetchall()]
            except sqlite3.Error as e:
                raise StoreError(f"{self.path}: {e}") from None

    def _migrate(self) -> None:
        with self.write() as db:
            db.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
            row = db.execute("SELECT version FROM schema_version").fetchone()
            version = row[0] if row else 0
            if version > SCHEMA_VERSION:
                raise StoreError(
                    f"{self.path}: schema version {version} is newer than this mlx-intent's ({SCHEMA_VERSION})"
                )
            if version == SCHEMA_VERSION:
                return
            for statements in MIGRATIONS[version:]:
                for statement in statements:
                    db.execute(statement)
            db.execute("DELETE FROM schema_version")
            db.execute("INSERT INTO schema_version VALUES (?)", (SCHEMA_VERSION,))

    def close(self) -> None:
        with self.lock:
            self.conn.close()


def open_store(home: Path, create: bool = True, busy_timeout_ms: int = BUSY_TIMEOUT_MS) -> Store | None:
    """The store of the models folder ``home`` (``Settings.home``); None where there is none and
    ``create`` is off (commands that only read never create one)."""
    path = db_path(home)
    if not create and not path.is_file():
        return None
    return Store(path, busy_timeout_ms)


# ---- results ------------------------------------------------------------------------------------


def margin_of(result: Mapping[str, Any]) -> float:
    """The gap the store keeps (``top_gap``), else the smallest gap the confidence allows (2 c - 1, the rest of
    the mass on one intent)."""
    gap = top_gap(result)
    return round(max(0.0, gap if gap is not None else 2 * float(result["confidence"]) - 1), 4)


def record_results(store: Store, records: Iterable[Mapping[str, Any]]) -> None:
    """Keep classification records (the log's lines: a result plus ts, text, lang; optional user, context)
    in one transaction.  A store that fails costs the records, never the answers: it is logged."""
    rows = []
    for r in records:
        if not isinstance(r.get("text"), str):
            continue
        fallbacks = r.get("fallbacks") or ()
        rest = {k: v for k, v in r.items() if k not in ("text", "context", "user")}
        rows.append(
            (
                r["id"],
                r.get("ts") or "",
                r.get("user"),
                r["text"],
                None if r.get("context") is None else json.dumps(r["context"], ensure_ascii=False),
                r.get("lang"),
                r["primary_intent"],
                float(r["confidence"]),
                json.dumps(r["all_intents"], ensure_ascii=False),
                r.get("tier"),
                r.get("model"),
                margin_of(r),
                sum(f.get("kind") in DISAGREEING for f in fallbacks),
                int(bool(r.get("context_used"))),
                json.dumps(rest, ensure_ascii=False, default=str),
            )
        )
    if not rows:
        return
    try:
        with store.write() as db:
            db.executemany(f"INSERT OR IGNORE INTO results VALUES ({', '.join('?' * 15)})", rows)
    except StoreError as e:
        store.lost += len(rows)
        log.warning("feedback store: %d results not recorded (%s)", len(rows), e)


# ---- feedback -----------------------------------------------------------------------------------


def _known(names: list[object], more: object = None) -> None:
    """Every name (and every item of ``more``, where it is a list) one of the 15 intents; else a FeedbackError
    that lists them."""
    unknown = [n for n in [*names, *(more if isinstance(more, list) else [])] if n not in INTENTS]
    if unknown:
        raise FeedbackError(f"unknown intent {unknown[0]!r}; the intents are: {', '.join(INTENTS)}")


def check_labels(primary_intent: object, all_intents: object = None) -> tuple[str, list[str]]:
    """(primary, all_intents) by the output schema's rules; all_intents defaults to the primary alone."""
    _known([primary_intent], all_intents)
    labels = [primary_intent] if all_intents is None else all_intents
    try:
        validate({"primary_intent": primary_intent, "confidence": 1.0, "all_intents": labels})
    except SchemaError as e:
        raise FeedbackError(f"{e} (all_intents: 1 to {MAX_INTENTS} distinct intents, primary_intent first)") from None
    return primary_intent, list(labels)  # type: ignore[return-value]


def add_feedback(
    store: Store,
    result_id: str,
    primary_intent: str | None = None,
    all_intents: list[str] | None = None,
    *,
    correct: bool = False,
    replace: bool = False,
    user: str | None = None,
    source: str = "cli",
) -> dict[str, Any]:
    """Store a correction (the right ``primary_intent``, optionally ``all_intents``) or, with ``correct``, a
    confirmation of result ``result_id``; one transaction.  UnknownResult, FeedbackError (bad intents) and
    DuplicateFeedback (feedback already given, unless ``replace``) say why not."""
    from datetime import datetime, timezone

    if not correct and primary_intent is None:
        raise FeedbackError('give the right primary_intent, or "correct": true to confirm the answer')
    _known([primary_intent] if primary_intent is not None else [], all_intents)
    if primary_intent is not None:
        check_labels(primary_intent, all_intents)
    ts = datetime.now(timezone.utc).isoformat(timespec="milliseconds")
    with store.write() as db:
        row = db.execute("SELECT primary_intent, all_intents FROM results WHERE id = ?", (result_id,)).fetchone()
        if row is None:
            raise UnknownResult(
                f"unknown result id {result_id!r}: not in {store.path} (results are recorded by mlx-intent serve, "
                "and by classify --record)"
            )
        answered, answered_all = row[0], json.loads(row[1])
        if correct:
            if primary_intent not in (None, answered):
                raise FeedbackError(f"a confirmation of {result_id} names {primary_intent}, but it answered {answered}")
            primary_intent, all_intents = check_labels(answered, answered_all if all_intents is None else all_intents)
        else:
            primary_intent, all_intents = check_labels(primary_intent, all_intents)
        earlier = db.execute("SELECT correct, primary_intent FROM feedback WHERE id = ?", (result_id,)).fetchone()
        if earlier is not None and not replace:
            verdict = "confirmed" if earlier[0] else f"corrected to {earlier[1]}"
            raise DuplicateFeedback(
                f"feedback for {result_id} was already given ({verdict}); replace it with --replace "
                '(HTTP: "replace": true)'
            )
        right = primary_intent == answered
        db.execute(
            "INSERT OR REPLACE INTO feedback (id, ts, user, source, correct, primary_intent, all_intents) "
            "VALUES (?, ?, ?, ?, ?, ?, ?)",
            (result_id, ts, user, source, int(right), primary_intent, json.dumps(all_intents)),
        )
    return {
        "id": result_id,
        "verdict": "confirmed" if right else "corrected",
        "answer": answered,
        "primary_intent": primary_intent,
        "all_intents": all_intents,
        "replaced": earlier is not None,
    }


_JOINED = """SELECT f.seq, f.id, f.ts, f.user AS feedback_user, f.source, f.correct, f.primary_intent, f.all_intents,
    r.ts AS result_ts, r.user, r.text, r.context, r.lang, r.primary_intent AS answer, r.all_intents AS answer_all,
    r.confidence, r.tier, r.model FROM feedback f JOIN results r ON r.id = f.id"""


def _joined(row: dict) -> dict[str, Any]:
    return {
        **row,
        "correct": bool(row["correct"]),
        "all_intents": json.loads(row["all_intents"]),
        "answer_all": json.loads(row["answer_all"]),
        "context": None if row["context"] is None else json.loads(row["context"]),
    }


def list_feedback(store: Store, limit: int | None = None) -> list[dict[str, Any]]:
    """Feedback joined with its results, newest first."""
    rows = store.read(_JOINED + " ORDER BY f.seq DESC LIMIT ?", (-1 if limit is None else limit,))
    return [_joined(r) for r in rows]


def written(store: Store) -> int:
    """Feedback writes so far (a replacement counts): what ``Recalibrator`` counts new records by."""
    return store.read("SELECT coalesce(max(seq), 0) AS n FROM feedback")[0]["n"]
