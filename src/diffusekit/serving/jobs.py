"""The durable job store: every change committed before it is answered.

:class:`BaseJobStore` is the interface the server uses, with the SQL both stores share;
:class:`JobStore` keeps the jobs in one SQLite file in WAL mode (the embedded default, one server
per file) and ``jobs_postgres.PostgresJobStore`` in a PostgreSQL database that several server
processes share (``diffusekit serve --db postgresql://...``); ``service.open_store`` picks one.

Restart rules (:meth:`BaseJobStore.recover`): queued jobs stay queued; a job whose process died
while running it becomes ``interrupted`` and runs again (its seed is stored, so the images are the
same); a job that was already on its second run when its process died again is ``failed`` (no crash
loop); finished jobs and their images stay. :meth:`BaseJobStore.start_next` is atomic: two workers,
in one process or several, never start the same job.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
import threading
import time
import uuid
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

PENDING = ("queued", "interrupted")
FINISHED = ("succeeded", "failed", "cancelled")
STATUSES = ("queued", "running", "interrupted", *FINISHED)
#: Runs a job may start before a process death during it marks it failed.
MAX_ATTEMPTS = 2
#: The error of a job whose process died during its last allowed run.
INTERRUPTED_TWICE = {"code": "interrupted", "message": "the server stopped during this job twice "
                     "(interrupted twice); it is not run again"}
#: The columns after ``seq``, the same in both stores (``seq`` is how each database numbers rows).
COLUMNS = """
    id TEXT UNIQUE NOT NULL,
    status TEXT NOT NULL,
    params TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    step INTEGER NOT NULL DEFAULT 0,
    total INTEGER NOT NULL DEFAULT 0,
    images TEXT NOT NULL DEFAULT '[]',
    error TEXT,
    created DOUBLE PRECISION NOT NULL,
    started DOUBLE PRECISION,
    finished DOUBLE PRECISION
"""
INDEX = "CREATE INDEX IF NOT EXISTS jobs_status ON jobs (status, seq)"
PENDING_SQL = f"status IN {PENDING}"
#: Runs one statement: ``(sql, args) -> rows`` (rows read by column name). Parameters are written ``?``
#: in the shared SQL; a store whose driver wants another style converts them.
Execute = Callable[[str, tuple], list]


class QueueFull(Exception):
    """The queue holds ``--max-queue`` pending jobs already."""


class BaseJobStore(ABC):
    """Jobs in a database; thread-safe. Subclasses supply the connection and the two steps whose
    atomicity depends on the database (claiming the next job, and what counts as a dead run)."""

    @abstractmethod
    def close(self) -> None:
        """Release the connection (and, in PostgreSQL, the running jobs' liveness locks)."""

    @abstractmethod
    def _query(self, sql: str, args: tuple = ()) -> list:
        """Run one statement on its own (atomic, committed); its rows."""

    @abstractmethod
    def _transaction(self) -> contextlib.AbstractContextManager[Execute]:
        """A transaction during which every other ``add`` waits; committed unless it raises."""

    @abstractmethod
    def start_next(self) -> dict[str, Any] | None:
        """Mark the oldest pending job running (one attempt more) and return it; None when none waits.
        Atomic: concurrent callers (threads, processes, machines) never get the same job."""

    @abstractmethod
    def recover(self) -> None:
        """Apply the restart rules to the running jobs whose process died."""

    def _write(self, sql: str, args: tuple = ()) -> int:
        """Run one UPDATE on its own; the number of rows it changed."""
        return len(self._query(sql + " RETURNING seq", args))

    # -- writing ----------------------------------------------------------------------------------

    def add(self, params: dict[str, Any], total: int, max_queue: int) -> tuple[str, int]:
        """Commit a new queued job; (its id, its queue position, 0 = next). QueueFull when full."""
        job_id = uuid.uuid4().hex
        with self._transaction() as execute:
            pending = execute(f"SELECT COUNT(*) AS n FROM jobs WHERE {PENDING_SQL}", ())[0]["n"]
            if pending >= max_queue:
                raise QueueFull(f"the queue is full ({max_queue} jobs waiting); try again later")
            execute("INSERT INTO jobs (id, status, params, total, created) VALUES (?, 'queued', ?, ?, ?)",
                    (job_id, json.dumps(params), total, time.time()))
        return job_id, pending

    def _recover_dead(self, execute: Execute, seqs: list[int]) -> None:
        """The restart rules for running jobs ``seqs`` whose process died (inside a transaction)."""
        for seq in seqs:
            execute("UPDATE jobs SET status = 'failed', finished = ?, error = ? WHERE seq = ? AND attempts >= ?",
                    (time.time(), json.dumps(INTERRUPTED_TWICE), seq, MAX_ATTEMPTS))
            execute("UPDATE jobs SET status = 'interrupted', step = 0 WHERE seq = ? AND status = 'running'", (seq,))

    def finish(self, job_id: str, status: str, step: int, images: list[dict] | None = None,
               error: dict[str, str] | None = None) -> None:
        """Record a job's end (succeeded, failed or cancelled) and the steps it ran (progress while it
        runs is kept in memory by the worker: one disk sync per step would slow jobs down)."""
        self._write("UPDATE jobs SET status = ?, step = ?, images = ?, error = ?, finished = ? WHERE id = ?",
                    (status, step, json.dumps(images or []), json.dumps(error) if error else None, time.time(),
                     job_id))

    def cancel_pending(self, job_id: str) -> bool:
        """Cancel a job that has not started; False when it is no longer pending."""
        return self._write(f"UPDATE jobs SET status = 'cancelled', finished = ? WHERE id = ? AND {PENDING_SQL}",
                           (time.time(), job_id)) == 1

    # -- reading ----------------------------------------------------------------------------------

    def get(self, job_id: str) -> dict[str, Any] | None:
        rows = self._query("SELECT * FROM jobs WHERE id = ?", (job_id,))
        return _job(rows[0]) if rows else None

    def list(self, status: str | None = None, limit: int = 50) -> list[dict[str, Any]]:
        """The newest jobs first, of one status or all."""
        where, args = ("WHERE status = ?", (status,)) if status else ("", ())
        return [_job(r) for r in self._query(f"SELECT * FROM jobs {where} ORDER BY seq DESC LIMIT ?", (*args, limit))]

    def position(self, job: dict[str, Any]) -> int | None:
        """How many pending jobs run before this one; None when it is not pending."""
        if job["status"] not in PENDING:
            return None
        rows = self._query(f"SELECT COUNT(*) AS n FROM jobs WHERE {PENDING_SQL} AND seq < "
                          "(SELECT seq FROM jobs WHERE id = ?)", (job["id"],))
        return rows[0]["n"]

    def counts(self) -> dict[str, int]:
        return {r["status"]: r["n"] for r in self._query("SELECT status, COUNT(*) AS n FROM jobs GROUP BY status")}


class JobStore(BaseJobStore):
    """Jobs in ``path`` (SQLite, WAL, ``synchronous=FULL``): one connection behind a lock. One server
    per file: :meth:`recover` takes every running job for dead (it runs when the server starts)."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self._db.row_factory = sqlite3.Row
        self._lock = threading.Lock()
        with self._lock:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.execute(f"CREATE TABLE IF NOT EXISTS jobs (seq INTEGER PRIMARY KEY AUTOINCREMENT, {COLUMNS})")
            self._db.execute(INDEX)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _query(self, sql: str, args: tuple = ()) -> list:
        with self._lock:
            return self._db.execute(sql, args).fetchall()

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[Execute]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")  # the write lock: one writer across processes too
            try:
                yield lambda sql, args: self._db.execute(sql, args).fetchall()
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def start_next(self) -> dict[str, Any] | None:
        rows = self._query(f"UPDATE jobs SET status = 'running', attempts = attempts + 1, started = ?, step = 0 "
                           f"WHERE seq = (SELECT seq FROM jobs WHERE {PENDING_SQL} ORDER BY seq LIMIT 1) "
                           "RETURNING *", (time.time(),))  # one statement: atomic under SQLite's write lock
        return _job(rows[0]) if rows else None

    def recover(self) -> None:
        with self._transaction() as execute:
            self._recover_dead(execute, [r["seq"] for r in execute("SELECT seq FROM jobs WHERE status = 'running'", ())])

def _job(row: Mapping[str, Any]) -> dict[str, Any]:
    return {"id": row["id"], "status": row["status"], "params": json.loads(row["params"]),
            "attempts": row["attempts"], "progress": {"step": row["step"], "total": row["total"]},
            "images": json.loads(row["images"]), "error": json.loads(row["error"]) if row["error"] else None,
            "created": row["created"], "started": row["started"], "finished": row["finished"]}
