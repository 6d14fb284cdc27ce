"""Running the server: the ``serve`` command's options -> loaded models, the app, uvicorn."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the parser imports this module: nothing heavy at import time
    from .service import Settings
    from .worker import StepHook


#: What ``--db`` takes (libpq's URL schemes).
POSTGRES_SCHEMES = ("postgresql://", "postgres://")


def default_data_dir() -> Path:
    """The per-user data folder: ``$XDG_DATA_HOME/diffusekit/serve`` (``~/.local/share/...``)."""
    base = os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share"
    return Path(base) / "diffusekit" / "serve"


def settings_from(args: argparse.Namespace) -> "Settings":
    """The server settings of the ``serve`` options; ValueError for an unsafe or bad combination."""
    from .requests import Limits
    from .security import check_bind
    from .service import Settings

    check_bind(args.host, args.api_key, args.insecure)
    if args.max_queue < 1:
        raise ValueError(f"--max-queue must be at least 1, got {args.max_queue}")
    if args.db is not None and not args.db.startswith(POSTGRES_SCHEMES):
        raise ValueError("--db must be a postgresql:// URL (leave it out for the SQLite file in --data-dir)")
    data_dir = Path(args.data_dir) if args.data_dir else default_data_dir()
    return Settings(data_dir=data_dir, host=args.host, api_key=args.api_key, max_queue=args.max_queue, limits=Limits(),
                    db=args.db)


def build(args: argparse.Namespace, step_hook: StepHook | None = None, worker_class=None, device: str | None = None):
    """The guarded ASGI app for the ``serve`` options (models loaded on ``device``, default ``--device``;
    ``worker_class``: how jobs run, default the in-process worker thread)."""
    try:
        from .app import create_app
    except ImportError as err:
        raise ImportError(f"diffusekit serve needs FastAPI and uvicorn: pip install 'diffusekit[serve]' ({err})") from None
    from ..cli_system import check_device
    from .models import load_models

    settings = settings_from(args)
    models = load_models(args.models, check_device(device or args.device), args.lora or [])
    extra = {"worker_class": worker_class} if worker_class is not None else {}
    return create_app(settings, models, step_hook, **extra), settings


def command_serve(args: argparse.Namespace, step_hook: StepHook | None = None) -> int:
    """Run ``diffusekit serve`` until interrupted."""
    from ..cli_system import set_threads

    set_threads(args.threads)
    app, settings = build(args, step_hook)
    import uvicorn

    jobs = "PostgreSQL (--db), images" if settings.db else "jobs"
    print(f"serving on http://{args.host}:{args.port}/ ({jobs} in {settings.data_dir})", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``diffusekit serve`` options (argparse only: nothing heavy is imported)."""
    parser.add_argument("models", nargs="*", metavar="MODEL",
                        help="a folder, single file or Hub id, optionally NAME=MODEL (default: the embedded digits "
                             "model, named digits)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind; beyond loopback needs --api-key")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--data-dir", help="job store and images (default: ~/.local/share/diffusekit/serve)")
    parser.add_argument("--api-key", default=os.environ.get("DIFFUSEKIT_API_KEY"),
                        help="require Authorization: Bearer KEY (default: $DIFFUSEKIT_API_KEY)")
    parser.add_argument("--insecure", action="store_true", help="allow a non-loopback --host without a key")
    parser.add_argument("--db", metavar="postgresql://...", default=os.environ.get("DIFFUSEKIT_DB") or None,
                        help="keep the jobs in this PostgreSQL database, shared by several servers (default: "
                             "$DIFFUSEKIT_DB, else SQLite in --data-dir; needs pip install 'diffusekit[postgres]')")
    parser.add_argument("--max-queue", type=int, default=64, help="jobs waiting before submissions get 429")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, mps...")
    parser.add_argument("--lora", action="append", metavar="[NAME=]FILE",
                        help="a LoRA jobs may turn on by name (loras: [{name, scale}]); repeatable")
    parser.add_argument("--ray", action="store_true",
                        help="run on Ray Serve: the pipelines in --num-replicas replicas (pip install 'diffusekit[ray]')")
    parser.add_argument("--ray-address", metavar="ADDR",
                        help="with --ray: a running cluster (e.g. auto, or HOST:6379) (default: start Ray here)")
    parser.add_argument("--num-replicas", type=int, metavar="N",
                        help="with --ray: pipeline replicas (default: the cluster's GPUs with --device cuda, else 1)")
