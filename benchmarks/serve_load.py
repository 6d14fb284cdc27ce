"""Load test of ``diffusekit serve`` (bounded, loopback only): N clients submit a digits job each at
once and poll it to its end, against a server process (``diffusekit serve``, one torch thread). Reports lost/duplicated jobs, 5xx answers, p50/p95 latencies of
submitting and of completion, and throughput.

    python benchmarks/serve_load.py [--clients 50] [--steps 10]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "serving"))
from servers import process_server  # noqa: E402

POLL_S = 0.25  # a client polling four times a second
DEADLINE_S = 600.0


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(share * (len(ordered) - 1))))]


def _client(url: str, index: int, steps: int, results: list, start: threading.Barrier) -> None:
    with httpx.Client(base_url=url, timeout=60) as client:
        start.wait()
        began = time.perf_counter()
        answer = client.post("/v1/jobs", json={"class_label": index % 10, "steps": steps, "seed": index})
        submitted = time.perf_counter()
        record = {"index": index, "status": answer.status_code, "submit_s": submitted - began, "codes": [answer.status_code]}
        if answer.status_code == 202:
            job_id = answer.json()["id"]
            record["id"] = job_id
            while time.perf_counter() - began < DEADLINE_S:
                poll = client.get(f"/v1/jobs/{job_id}")
                record["codes"].append(poll.status_code)
                if poll.status_code == 200 and poll.json()["status"] in ("succeeded", "failed", "cancelled"):
                    record["final"] = poll.json()["status"]
                    break
                time.sleep(POLL_S)
            record["done_s"] = time.perf_counter() - began
        results.append(record)


def run_load(url: str, clients: int, steps: int) -> dict:
    """Run the clients against the server at ``url``; the figures."""
    results: list[dict] = []
    start = threading.Barrier(clients)
    threads = [threading.Thread(target=_client, args=(url, i, steps, results, start)) for i in range(clients)]
    began = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(DEADLINE_S)
    wall = time.perf_counter() - began
    with httpx.Client(base_url=url, timeout=60) as client:
        stored = [job["id"] for job in client.get("/v1/jobs", params={"limit": 500}).json()["jobs"]]
    ids = [r["id"] for r in results if "id" in r]
    submit = [r["submit_s"] for r in results]
    done = [r["done_s"] for r in results if "done_s" in r]
    return {
        "clients": clients, "steps": steps, "accepted": len(ids),
        "succeeded": sum(r.get("final") == "succeeded" for r in results),
        "lost": len(set(ids) - set(stored)), "duplicated": len(ids) - len(set(ids)) + len(stored) - len(set(stored)),
        "server_errors": sum(code >= 500 for r in results for code in r["codes"]),
        "submit_p50_ms": 1000 * statistics.median(submit), "submit_p95_ms": 1000 * percentile(submit, 0.95),
        "done_p50_s": statistics.median(done), "done_p95_s": percentile(done, 0.95),
        "jobs_per_s": len(done) / wall, "wall_s": wall,
    }


def direct_jobs_per_s(steps: int, count: int = 20) -> float:
    """The ceiling: the same jobs called directly (no HTTP, no store), one torch thread, in this process."""
    import torch

    from diffusekit.cli_generate import generate_files
    from diffusekit.serving.models import generate_options, job_pipeline, load_models

    torch.set_num_threads(1)
    model = load_models([], "cpu")["digits"]
    with tempfile.TemporaryDirectory() as out:
        began = time.perf_counter()
        for i in range(count):
            options = generate_options(model, {"class_label": i % 10, "steps": steps, "seed": i, "n": 1},
                                       Path(out) / str(i), {})
            generate_files(job_pipeline(model, options), options, model.loaded)
        return count / (time.perf_counter() - began)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as data, process_server(Path(data)) as (url, process):
        figures = run_load(url, args.clients, args.steps)
    figures["direct_jobs_per_s"] = direct_jobs_per_s(args.steps)
    for key, value in figures.items():
        print(f"{key}: {value:.3f}" if isinstance(value, float) else f"{key}: {value}")


if __name__ == "__main__":
    main()
