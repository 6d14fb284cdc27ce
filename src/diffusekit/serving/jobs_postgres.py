"""The job store in PostgreSQL (``diffusekit serve --db postgresql://...``): several server processes,
on one machine or many, share one queue. psycopg 3, imported only here.

Claiming: :meth:`PostgresJobStore.start_next` locks the oldest pending row with ``SELECT ... FOR
UPDATE SKIP LOCKED`` (a concurrent claimer skips that row and takes the next one), marks it running
and commits, so two workers never start the same job.

Liveness: the claiming connection also takes a session advisory lock on the job and keeps it until
:meth:`finish`. PostgreSQL drops a session's locks when its connection ends (the process died, or its
machine's connection timed out), so a running job whose lock nobody holds belongs to a dead server.
:meth:`recover` applies the restart rules to those jobs only, never to a job that another live server
is running; it runs when a server starts and before every claim, so a dead server's job runs again on
a live one.
"""

from __future__ import annotations

import contextlib
import threading
import time
from typing import Any, Iterator

from .jobs import COLUMNS, INDEX, PENDING_SQL, BaseJobStore, Execute, _job

#: Advisory lock keys (one 64-bit space per database): the store-wide lock that ``add`` and the schema
#: take, and the base of the per-job liveness locks (``JOB_LOCK_BASE + seq``).
STORE_LOCK = 0x6466_6B00_0000_0000
JOB_LOCK_BASE = STORE_LOCK
CONNECT_TIMEOUT_S = 10


def _import_psycopg():
    try:
        import psycopg
        from psycopg.rows import dict_row
    except ImportError:
        raise ImportError("--db postgresql://... needs psycopg 3: pip install 'diffusekit[postgres]'") from None
    return psycopg, dict_row


class PostgresJobStore(BaseJobStore):
    """Jobs in the ``jobs`` table of the PostgreSQL database ``dsn`` (made when missing). Thread-safe:
    one connection behind a lock; each store (each server process) opens its own."""

    def __init__(self, dsn: str) -> None:
        psycopg, dict_row = _import_psycopg()
        try:
            self._db = psycopg.connect(dsn, autocommit=True, row_factory=dict_row, connect_timeout=CONNECT_TIMEOUT_S)
        except psycopg.OperationalError as err:
            raise ConnectionError(f"--db: cannot connect to the PostgreSQL database: {err}") from None
        self._lock = threading.RLock()
        self._held: dict[str, int] = {}  # id -> seq of the jobs this store runs (their liveness locks)
        with self._transaction() as execute:  # the lock: servers starting together make the table once
            execute(f"CREATE TABLE IF NOT EXISTS jobs (seq BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY, {COLUMNS})",
                    ())
            execute(INDEX, ())

    def close(self) -> None:
        """Close the connection; the jobs it still runs are left to recovery, as when the process dies."""
        with self._lock:
            if not self._db.closed and not self._db.broken:
                self._execute("SELECT pg_advisory_unlock_all()")  # now, not when the server notices the close
            self._db.close()
            self._held.clear()

    def _execute(self, sql: str, args: tuple = ()) -> list:
        cursor = self._db.execute(sql.replace("?", "%s"), args)
        return cursor.fetchall() if cursor.description is not None else []

    def _query(self, sql: str, args: tuple = ()) -> list:
        with self._lock:
            return self._execute(sql, args)

    @contextlib.contextmanager
    def _open(self) -> Iterator[Execute]:
        """A transaction on this store's connection (committed unless it raises)."""
        with self._lock, self._db.transaction():
            yield self._execute

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[Execute]:
        with self._open() as execute:
            execute("SELECT pg_advisory_xact_lock(?)", (STORE_LOCK,))
            yield execute

    def start_next(self) -> dict[str, Any] | None:
        self.recover()
        with self._lock:
            seq = None
            try:
                with self._open() as execute:
                    rows = execute(f"SELECT seq FROM jobs WHERE {PENDING_SQL} ORDER BY seq LIMIT 1 "
                                   "FOR UPDATE SKIP LOCKED", ())
                    if not rows:
                        return None
                    seq = rows[0]["seq"]
                    # Held only by a live session running the job: a pending job's lock is free.
                    execute("SELECT pg_advisory_lock(?)", (JOB_LOCK_BASE + seq,))
                    row = execute("UPDATE jobs SET status = 'running', attempts = attempts + 1, started = ?, "
                                  "step = 0 WHERE seq = ? RETURNING *", (time.time(), seq))[0]
            except BaseException:
                if seq is not None:  # a session lock outlives the rolled-back claim
                    self._unlock(seq)
                raise
            self._held[row["id"]] = seq
        return _job(row)

    def finish(self, job_id: str, status: str, step: int, images: list[dict] | None = None,
               error: dict[str, str] | None = None) -> None:
        super().finish(job_id, status, step, images, error)
        with self._lock:  # after the job has left 'running': recovery never sees it running unlocked
            seq = self._held.pop(job_id, None)
            if seq is not None:
                self._unlock(seq)

    def _unlock(self, seq: int) -> None:
        with self._lock:
            if not self._db.closed:
                self._execute("SELECT pg_advisory_unlock(?)", (JOB_LOCK_BASE + seq,))

    def recover(self) -> None:
        with self._open() as execute:
            # Rows being claimed are locked (skipped); a claimed job's liveness lock is taken before its claim commits.
            running = execute("SELECT seq FROM jobs WHERE status = 'running' FOR UPDATE SKIP LOCKED", ())
            mine = set(self._held.values())  # this session's own locks would be granted to it again
            dead = [r["seq"] for r in running if r["seq"] not in mine and
                    execute("SELECT pg_try_advisory_xact_lock(?) AS free", (JOB_LOCK_BASE + r["seq"],))[0]["free"]]
            self._recover_dead(execute, dead)
