"""A small version of benchmarks/serve_load.py: clients at once, no job lost or doubled, no 5xx."""

import sys
from pathlib import Path

from diffusekit.serving.app import create_app
from diffusekit.serving.service import Settings
from servers import thread_server

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from serve_load import run_load  # noqa: E402


def test_clients_at_once_lose_nothing(digits_models, tmp_path):
    app = create_app(Settings(data_dir=tmp_path), digits_models)
    with thread_server(app) as url:
        figures = run_load(url, clients=12, steps=2)
    assert figures["accepted"] == figures["succeeded"] == 12
    assert (figures["lost"], figures["duplicated"], figures["server_errors"]) == (0, 0, 0)
