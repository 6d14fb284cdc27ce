"""The job store's restart rules, without a server."""

import pytest

from diffusekit.serving.jobs import JobStore, QueueFull


@pytest.fixture
def store(tmp_path):
    store = JobStore(tmp_path / "jobs.sqlite3")
    yield store
    store.close()


def test_restart_rules(tmp_path, store):
    first, _ = store.add({"seed": 1}, total=3, max_queue=8)
    second, position = store.add({"seed": 2}, total=3, max_queue=8)
    assert position == 1
    assert store.start_next()["id"] == first
    store.close()
    reopened = JobStore(tmp_path / "jobs.sqlite3")  # the process died while `first` ran
    reopened.recover()
    assert reopened.get(first)["status"] == "interrupted" and reopened.get(second)["status"] == "queued"
    assert reopened.position(reopened.get(first)) == 0  # runs again first
    again = reopened.start_next()
    assert again["id"] == first and again["attempts"] == 2
    reopened.recover()  # it died a second time
    dead = reopened.get(first)
    assert dead["status"] == "failed" and dead["error"]["code"] == "interrupted"
    assert "interrupted twice" in dead["error"]["message"]
    assert reopened.start_next()["id"] == second
    reopened.finish(second, "succeeded", 3, images=[{"seed": 2}])
    reopened.recover()
    assert reopened.get(second)["status"] == "succeeded" and reopened.get(second)["images"] == [{"seed": 2}]
    reopened.close()


def test_cancel_and_a_full_queue(store):
    job, _ = store.add({}, total=1, max_queue=1)
    with pytest.raises(QueueFull, match="queue is full"):
        store.add({}, total=1, max_queue=1)
    assert store.cancel_pending(job) and not store.cancel_pending(job)
    assert store.get(job)["status"] == "cancelled" and store.start_next() is None
    assert store.list("cancelled")[0]["id"] == job and store.counts() == {"cancelled": 1}
