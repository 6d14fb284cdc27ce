"""The job store contract, run against SQLite and PostgreSQL; concurrent workers on one database; and
``diffusekit serve --db postgresql://...`` end to end.

PostgreSQL: a throwaway server (``initdb`` + ``pg_ctl`` of the newest installed PostgreSQL, 15 in CI, run
as the ``postgres`` user when the tests run as root, on a free loopback port, stopped at the end), or
the server of ``$DIFFUSEKIT_TEST_POSTGRES_DSN`` (a ``postgresql://`` URL of a role that may create
databases). Each test gets a fresh database. Without either, the PostgreSQL tests fail (not skip),
naming what to install."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Callable, Iterator
from urllib.parse import urlsplit

import httpx
import pytest

from diffusekit.serving.jobs import BaseJobStore, JobStore, QueueFull
from servers import free_port, stop, wait_healthy, wait_job

DSN_VARIABLE = "DIFFUSEKIT_TEST_POSTGRES_DSN"
#: Where Debian's packages put the server binaries (postgresql-15: /usr/lib/postgresql/15/bin).
BIN_GLOB = "/usr/lib/postgresql/*/bin/initdb"
#: Bound on every start, stop and subprocess wait.
WAIT_S = 60


def _bin_dir() -> Path:
    """The newest installed server's binaries."""
    found = sorted(Path("/").glob(BIN_GLOB.lstrip("/")), key=lambda path: int(path.parts[-3]))
    if not found:
        pytest.fail(f"PostgreSQL server binaries not found (no {BIN_GLOB}): install them (apt-get install -y "
                    f"postgresql-15) or set {DSN_VARIABLE} to a postgresql:// URL", pytrace=False)
    return found[-1].parent


def _as_server_user(command: list[str]) -> list[str]:
    """initdb refuses root: run the server's commands as ``postgres`` then."""
    return ["runuser", "-u", "postgres", "--", *command] if os.geteuid() == 0 else command


@contextlib.contextmanager
def _throwaway_server() -> Iterator[str]:
    """A PostgreSQL server in a temporary folder; its superuser URL."""
    bin_dir, port = _bin_dir(), free_port()
    root = Path(tempfile.mkdtemp(prefix="diffusekit-pg-"))
    if os.geteuid() == 0:
        shutil.chown(root, "postgres", "postgres")
    data, log = root / "data", root / "server.log"

    def run(*command: str) -> None:
        result = subprocess.run(_as_server_user([str(bin_dir / command[0]), *command[1:]]), capture_output=True,
                                text=True, timeout=WAIT_S)
        assert result.returncode == 0, f"{command[0]} failed: {result.stderr}{log.read_text() if log.exists() else ''}"

    try:
        run("initdb", "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync")
        options = f"-c listen_addresses=127.0.0.1 -p {port} -k {root} -c fsync=off -c max_connections=50"
        run("pg_ctl", "-D", str(data), "-o", options, "-l", str(log), "-w", "-t", str(WAIT_S), "start")
        try:
            yield f"postgresql://postgres@127.0.0.1:{port}/postgres"
        finally:
            run("pg_ctl", "-D", str(data), "-m", "immediate", "-w", "-t", str(WAIT_S), "stop")
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def postgres_server() -> Iterator[str]:
    """The URL of a PostgreSQL server whose role may create databases."""
    if os.environ.get(DSN_VARIABLE):
        yield os.environ[DSN_VARIABLE]
        return
    with _throwaway_server() as dsn:
        yield dsn


@pytest.fixture
def postgres_dsn(postgres_server) -> Iterator[str]:
    """A new, empty database on the server (dropped afterwards)."""
    import psycopg

    name = f"diffusekit_test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(postgres_server, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    yield urlsplit(postgres_server)._replace(path=f"/{name}").geturl()
    with psycopg.connect(postgres_server, autocommit=True) as admin:
        admin.execute(f'DROP DATABASE "{name}" WITH (FORCE)')


@pytest.fixture(params=["sqlite", "postgresql"])
def open_store(request, tmp_path) -> Iterator[Callable[[], BaseJobStore]]:
    """Opens a store on one database (each call: a new connection, as another server process has)."""
    if request.param == "sqlite":
        def opener() -> BaseJobStore:
            return JobStore(tmp_path / "jobs.sqlite3")
    else:
        from diffusekit.serving.jobs_postgres import PostgresJobStore

        dsn = request.getfixturevalue("postgres_dsn")

        def opener() -> BaseJobStore:
            return PostgresJobStore(dsn)
    opened: list[BaseJobStore] = []

    def tracked() -> BaseJobStore:
        opened.append(opener())
        return opened[-1]

    yield tracked
    for store in opened:
        store.close()


# -- the contract both stores keep ----------------------------------------------------------------

def test_restart_rules(open_store):
    store = open_store()
    first, _ = store.add({"seed": 1}, total=3, max_queue=8)
    second, position = store.add({"seed": 2}, total=3, max_queue=8)
    assert position == 1
    assert store.start_next()["id"] == first
    store.close()  # the process died while `first` ran
    reopened = open_store()
    reopened.recover()
    assert reopened.get(first)["status"] == "interrupted" and reopened.get(second)["status"] == "queued"
    assert reopened.position(reopened.get(first)) == 0  # runs again first
    again = reopened.start_next()
    assert again["id"] == first and again["attempts"] == 2 and again["status"] == "running"
    reopened.close()  # it died a second time
    third = open_store()
    third.recover()
    dead = third.get(first)
    assert dead["status"] == "failed" and dead["error"]["code"] == "interrupted"
    assert "interrupted twice" in dead["error"]["message"] and dead["finished"] is not None
    assert third.start_next()["id"] == second
    third.finish(second, "succeeded", 3, images=[{"seed": 2}])
    third.recover()
    done = third.get(second)
    assert done["status"] == "succeeded" and done["images"] == [{"seed": 2}] and done["progress"] == {"step": 3,
                                                                                                      "total": 3}


def test_cancel_and_a_full_queue(open_store):
    store = open_store()
    job, _ = store.add({}, total=1, max_queue=1)
    with pytest.raises(QueueFull, match="queue is full"):
        store.add({}, total=1, max_queue=1)
    assert store.cancel_pending(job) and not store.cancel_pending(job)
    assert store.get(job)["status"] == "cancelled" and store.start_next() is None
    assert store.list("cancelled")[0]["id"] == job and store.counts() == {"cancelled": 1}


def test_reading_jobs(open_store):
    store = open_store()
    ids = [store.add({"seed": i, "prompt": "ü"}, total=2, max_queue=8)[0] for i in range(3)]
    assert store.get("nope") is None
    assert [j["id"] for j in store.list()] == ids[::-1] and [j["id"] for j in store.list(limit=2)] == ids[:0:-1]
    assert [store.position(store.get(i)) for i in ids] == [0, 1, 2]
    running = store.start_next()
    assert running["id"] == ids[0] and store.position(running) is None
    assert [store.position(store.get(i)) for i in ids[1:]] == [0, 1]
    store.finish(ids[0], "failed", 1, error={"code": "invalid_input", "message": "ValueError: bad"})
    failed = store.get(ids[0])
    assert failed["error"] == {"code": "invalid_input", "message": "ValueError: bad"} and failed["images"] == []
    assert failed["params"] == {"seed": 0, "prompt": "ü"} and failed["created"] <= failed["started"] <= failed["finished"]
    assert store.counts() == {"failed": 1, "queued": 2} and [j["id"] for j in store.list("queued")] == ids[:0:-1]
    assert open_store().get(ids[1])["status"] == "queued"  # committed: another connection sees it


def test_two_workers_on_one_database_run_each_job_once(open_store):
    """Two workers, each with its own connection, claim 20 jobs as fast as they can."""
    submitter = open_store()
    ids = {submitter.add({"seed": i}, total=1, max_queue=64)[0] for i in range(20)}
    claims: dict[str, list[str]] = {"a": [], "b": []}
    stores = {name: open_store() for name in claims}
    errors: list[BaseException] = []

    def work(name: str) -> None:
        try:
            while (job := stores[name].start_next()) is not None:
                claims[name].append(job["id"])
                stores[name].finish(job["id"], "succeeded", 1)
        except BaseException as err:  # noqa: BLE001 - reported by the assertion below
            errors.append(err)

    threads = [threading.Thread(target=work, args=(name,)) for name in claims]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(WAIT_S)
    assert not errors
    taken = claims["a"] + claims["b"]
    assert sorted(taken) == sorted(ids)  # every job once: none lost, none doubled
    assert submitter.counts() == {"succeeded": 20}
    assert all(submitter.get(i)["attempts"] == 1 for i in ids)


# -- PostgreSQL: several live servers on one database ---------------------------------------------

def test_a_live_servers_running_job_is_not_recovered_by_another(postgres_dsn):
    from diffusekit.serving.jobs_postgres import PostgresJobStore

    live, other = PostgresJobStore(postgres_dsn), PostgresJobStore(postgres_dsn)
    try:
        job, _ = live.add({}, total=1, max_queue=8)
        assert live.start_next()["id"] == job
        other.recover()  # a server starting while `live` runs the job
        assert other.start_next() is None and other.get(job)["status"] == "running"
        live.recover()
        assert live.get(job)["status"] == "running"
        live.close()  # its process dies: the connection, and the job's lock, go
        again = other.start_next()  # claiming recovers dead servers' jobs first
        assert again["id"] == job and again["attempts"] == 2
        other.finish(job, "succeeded", 1)
        assert other.get(job)["status"] == "succeeded"
    finally:
        live.close()
        other.close()


#: A server process that claims a job and keeps running it (until killed).
CLAIM_AND_HANG = """
import sys, time
from diffusekit.serving.jobs_postgres import PostgresJobStore
store = PostgresJobStore(sys.argv[1])
store.start_next()
time.sleep(600)
"""


def _poll(condition: Callable[[], object]) -> object:
    """``condition()`` once it is true (bounded by WAIT_S)."""
    deadline = time.monotonic() + WAIT_S
    while not (result := condition()):
        assert time.monotonic() < deadline, "the condition did not hold in time"
        time.sleep(0.05)
    return result


def test_the_job_of_a_killed_server_runs_again_on_a_live_one(postgres_dsn):
    """SIGKILL: no goodbye to the database; PostgreSQL drops the dead connection's job lock itself."""
    from diffusekit.serving.jobs_postgres import PostgresJobStore

    live = PostgresJobStore(postgres_dsn)
    try:
        job, _ = live.add({}, total=1, max_queue=8)
        doomed = subprocess.Popen([sys.executable, "-c", CLAIM_AND_HANG, postgres_dsn])
        try:
            _poll(lambda: live.get(job)["status"] == "running")
            assert live.start_next() is None  # its server is alive: not taken
        finally:
            doomed.kill()
            doomed.wait(WAIT_S)
        again = _poll(live.start_next)
        assert again["id"] == job and again["attempts"] == 2
    finally:
        live.close()


def test_a_bad_db_option_is_named():
    from diffusekit.cli import build_parser
    from diffusekit.serving.server import settings_from

    args = build_parser().parse_args(["serve", "--db", "mysql://x"])
    with pytest.raises(ValueError, match="--db must be a postgresql:// URL"):
        settings_from(args)


def test_an_unreachable_database_is_a_connection_error():
    from diffusekit.serving.jobs_postgres import PostgresJobStore

    with pytest.raises(ConnectionError, match="--db: cannot connect to the PostgreSQL database"):
        PostgresJobStore(f"postgresql://nobody@127.0.0.1:{free_port()}/none")


# -- end to end -----------------------------------------------------------------------------------

@contextlib.contextmanager
def _servers(count: int, dsn: str, data_dir: Path) -> Iterator[list[str]]:
    """``count`` ``diffusekit serve --db DSN`` processes on one data dir, started together; their URLs."""
    ports = [free_port() for _ in range(count)]
    processes = [subprocess.Popen([sys.executable, "-m", "diffusekit", "serve", "--port", str(port), "--data-dir",
                                   str(data_dir), "--db", dsn, "--threads", "1"],
                                  env=dict(os.environ, HF_HUB_OFFLINE="1"), stdout=subprocess.DEVNULL,
                                  stderr=subprocess.PIPE) for port in ports]
    urls = [f"http://127.0.0.1:{port}" for port in ports]
    try:
        for url, process in zip(urls, processes):
            try:
                wait_healthy(url, process)
            except RuntimeError as err:
                raise RuntimeError(f"{err}: {process.stderr.read().decode(errors='replace')[-2000:]}") from None
        yield urls
    finally:
        for process in processes:
            process.terminate()  # both at once, then wait
        for process in processes:
            stop(process)


def test_two_servers_on_one_database_serve_jobs_over_http(postgres_dsn, tmp_path):
    """Two ``diffusekit serve --db`` processes share the queue and the data dir (images)."""
    with _servers(2, postgres_dsn, tmp_path) as (first, second):
        with httpx.Client(base_url=first, timeout=30) as a, httpx.Client(base_url=second, timeout=30) as b:
            ids = []
            for i, client in enumerate((a, b, a, b)):
                answer = client.post("/v1/jobs", json={"class_label": i, "steps": 2, "seed": 10 + i})
                assert answer.status_code == 202, answer.text
                ids.append(answer.json()["id"])
            jobs = [wait_job(client, job_id) for client, job_id in zip((b, a, b, a), ids)]  # asked on the other one
            assert [j["status"] for j in jobs] == ["succeeded"] * 4
            assert [j["images"][0]["seed"] for j in jobs] == [10, 11, 12, 13]
            assert {j["id"] for j in a.get("/v1/jobs").json()["jobs"]} == set(ids)
            for client, job_id in zip((a, b, a, b), ids):
                image = client.get(f"/v1/jobs/{job_id}/images/0")
                assert image.status_code == 200 and image.content[:8] == b"\x89PNG\r\n\x1a\n"
            assert b.get("/health").json()["jobs"] == {"succeeded": 4}
