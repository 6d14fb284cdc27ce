"""``diffusekit serve`` for the fault test, with a hook that only this launcher installs: when
``DIFFUSEKIT_TEST_CRASH_SEED`` is set, a job of that seed kills the process (SIGKILL) at its first step."""

import os
import signal
import sys

from diffusekit.cli import build_parser
from diffusekit.serving.server import command_serve


def crash_hook(seed: int):
    def hook(job: dict, step: int) -> None:
        if job["params"]["seed"] == seed:
            os.kill(os.getpid(), signal.SIGKILL)

    return hook


if __name__ == "__main__":
    args = build_parser().parse_args(["serve", *sys.argv[1:]])
    seed = os.environ.get("DIFFUSEKIT_TEST_CRASH_SEED")
    sys.exit(command_serve(args, crash_hook(int(seed)) if seed else None))
