"""The durable job store: one SQLite file in WAL mode, every change committed before it is answered.

Restart rules (:meth:`JobStore.recover`): queued jobs stay queued; a job that was running when the
process died becomes ``interrupted`` and runs again (its seed is stored, so the images are the same);
a job that was already on its second run when the process died again is ``failed`` (no crash loop);
finished jobs and their images stay.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
import uuid
from pathlib import Path
from typing import Any

PENDING = ("queued", "interrupted")
FINISHED = ("succeeded", "failed", "cancelled")
STATUSES = ("queued", "running", "interrupted", *FINISHED)
#: Runs a job may start before a process death during it marks it failed.
MAX_ATTEMPTS = 2

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT UNIQUE NOT NULL,
    status TEXT NOT NULL,
    params TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    step INTEGER NOT NULL DEFAULT 0,
    total INTEGER NOT NULL DEFAULT 0,
    images TEXT NOT NULL DEFAULT '[]',
    error TEXT,
    created REAL NOT NULL,
    started REAL,
    finished REAL
);
CREATE INDEX IF NOT EXISTS jobs_status ON jobs (status, seq);
"""


class QueueFull(Exception):
    """The queue holds ``--max-queue`` pending jobs already."""


class JobStore:
    """Jobs in ``path`` (SQLite, WAL). Thread-safe: one connection behind a lock."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self._db.row_factory = sqlite3.Row
        self._lock = threading.Lock()
        with self._lock:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.executescript(_SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _write(self, sql: str, args: tuple = ()) -> int:
        with self._lock:
            return self._db.execute(sql, args).rowcount

    def _rows(self, sql: str, args: tuple = ()) -> list[sqlite3.Row]:
        with self._lock:
            return self._db.execute(sql, args).fetchall()

    # -- writing ----------------------------------------------------------------------------------

    def add(self, params: dict[str, Any], total: int, max_queue: int) -> tuple[str, int]:
        """Commit a new queued job; (its id, its queue position, 0 = next). QueueFull when full."""
        job_id = uuid.uuid4().hex
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                pending = self._db.execute(
                    f"SELECT COUNT(*) FROM jobs WHERE status IN {PENDING}").fetchone()[0]
                if pending >= max_queue:
                    raise QueueFull(f"the queue is full ({max_queue} jobs waiting); try again later")
                self._db.execute("INSERT INTO jobs (id, status, params, total, created) VALUES (?, 'queued', ?, ?, ?)",
                                 (job_id, json.dumps(params), total, time.time()))
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return job_id, pending

    def recover(self) -> None:
        """Apply the restart rules to jobs a dead process left running."""
        self._write("UPDATE jobs SET status = 'failed', finished = ?, error = ? WHERE status = 'running' "
                    "AND attempts >= ?", (time.time(), json.dumps({
                        "code": "interrupted", "message": "the server stopped during this job twice "
                        "(interrupted twice); it is not run again"}), MAX_ATTEMPTS))
        self._write("UPDATE jobs SET status = 'interrupted', step = 0 WHERE status = 'running'")

    def start_next(self) -> dict[str, Any] | None:
        """Mark the oldest pending job running (one attempt more) and return it; None when none waits."""
        with self._lock:
            row = self._db.execute(f"SELECT id FROM jobs WHERE status IN {PENDING} ORDER BY seq LIMIT 1").fetchone()
            if row is None:
                return None
            self._db.execute("UPDATE jobs SET status = 'running', attempts = attempts + 1, started = ?, step = 0 "
                             "WHERE id = ?", (time.time(), row["id"]))
        return self.get(row["id"])

    def finish(self, job_id: str, status: str, step: int, images: list[dict] | None = None,
               error: dict[str, str] | None = None) -> None:
        """Record a job's end (succeeded, failed or cancelled) and the steps it ran (progress while it
        runs is kept in memory by the worker: one disk sync per step would slow jobs down)."""
        self._write("UPDATE jobs SET status = ?, step = ?, images = ?, error = ?, finished = ? WHERE id = ?",
                    (status, step, json.dumps(images or []), json.dumps(error) if error else None, time.time(),
                     job_id))

    def cancel_pending(self, job_id: str) -> bool:
        """Cancel a job that has not started; False when it is no longer pending."""
        return self._write(f"UPDATE jobs SET status = 'cancelled', finished = ? WHERE id = ? AND status IN {PENDING}",
                           (time.time(), job_id)) == 1

    # -- reading ----------------------------------------------------------------------------------

    def get(self, job_id: str) -> dict[str, Any] | None:
        rows = self._rows("SELECT * FROM jobs WHERE id = ?", (job_id,))
        return _job(rows[0]) if rows else None

    def list(self, status: str | None = None, limit: int = 50) -> list[dict[str, Any]]:
        """The newest jobs first, of one status or all."""
        where, args = ("WHERE status = ?", (status,)) if status else ("", ())
        return [_job(r) for r in self._rows(f"SELECT * FROM jobs {where} ORDER BY seq DESC LIMIT ?", (*args, limit))]

    def position(self, job: dict[str, Any]) -> int | None:
        """How many pending jobs run before this one; None when it is not pending."""
        if job["status"] not in PENDING:
            return None
        rows = self._rows(f"SELECT COUNT(*) FROM jobs WHERE status IN {PENDING} AND seq < "
                          "(SELECT seq FROM jobs WHERE id = ?)", (job["id"],))
        return rows[0][0]

    def counts(self) -> dict[str, int]:
        return {r["status"]: r["n"] for r in self._rows("SELECT status, COUNT(*) AS n FROM jobs GROUP BY status")}


def _job(row: sqlite3.Row) -> dict[str, Any]:
    return {"id": row["id"], "status": row["status"], "params": json.loads(row["params"]),
            "attempts": row["attempts"], "progress": {"step": row["step"], "total": row["total"]},
            "images": json.loads(row["images"]), "error": json.loads(row["error"]) if row["error"] else None,
            "created": row["created"], "started": row["started"], "finished": row["finished"]}
