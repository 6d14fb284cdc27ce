"""Job events for server-sent event streams: ``queued``, ``started``, ``progress``, then one of
``succeeded``, ``failed``, ``cancelled`` (its data is the job). Kept in memory, numbered per job so a
client resumes with ``Last-Event-ID``; after a restart a job's stream starts again from the store."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections import OrderedDict
from typing import Any, AsyncIterator, Callable

from .jobs import FINISHED

#: Jobs whose events stay in memory (the oldest are dropped first).
KEPT_JOBS = 2000
POLL_SECONDS = 0.05


class EventLog:
    """Every job's events, thread-safe: the worker thread publishes, the event loop reads."""

    def __init__(self) -> None:
        self._events: OrderedDict[str, list[tuple[int, str, dict]]] = OrderedDict()
        self._lock = threading.Lock()

    def publish(self, job_id: str, event: str, data: dict[str, Any]) -> None:
        with self._lock:
            events = self._events.setdefault(job_id, [])
            events.append((len(events) + 1, event, data))
            self._events.move_to_end(job_id)
            while len(self._events) > KEPT_JOBS:
                self._events.popitem(last=False)

    def known(self, job_id: str) -> bool:
        with self._lock:
            return job_id in self._events

    def since(self, job_id: str, last_id: int) -> list[tuple[int, str, dict]]:
        with self._lock:
            return [e for e in self._events.get(job_id, []) if e[0] > last_id]

    def replay_from_store(self, job: dict[str, Any], view: Callable[[dict], dict]) -> None:
        """A job this process has no events of (made before a restart): ``queued``, and its end if it ended."""
        with self._lock:
            if job["id"] in self._events:
                return
        self.publish(job["id"], "queued", {"id": job["id"]})
        if job["status"] in FINISHED:
            self.publish(job["id"], job["status"], view(job))


def sse(event_id: int, event: str, data: dict[str, Any]) -> str:
    return f"id: {event_id}\nevent: {event}\ndata: {json.dumps(data)}\n\n"


async def stream(log: EventLog, job_id: str, last_id: int, keep_alive_s: float,
                 disconnected: Callable) -> AsyncIterator[str]:
    """The job's events after ``last_id``, until its final one; a comment every ``keep_alive_s`` of quiet."""
    quiet_since = time.monotonic()
    while True:
        events = log.since(job_id, last_id)
        for event_id, event, data in events:
            yield sse(event_id, event, data)
            last_id = event_id
            if event in FINISHED:
                return
        if events:
            quiet_since = time.monotonic()
        elif time.monotonic() - quiet_since >= keep_alive_s:
            yield ": keep-alive\n\n"
            quiet_since = time.monotonic()
        if await disconnected():
            return
        await asyncio.sleep(POLL_SECONDS)
