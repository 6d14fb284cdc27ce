"""What the command line asks of the machine: torch threads, the device, the progress bar."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from .cli_metadata import CommandError

#: More intra-op threads than this rarely help diffusion models on a CPU.
MAX_THREADS = 8


def _usable_cpus() -> list[int]:
    if hasattr(os, "sched_getaffinity"):
        return sorted(os.sched_getaffinity(0))
    return list(range(os.cpu_count() or 1))


def physical_cores(sys_cpu: Path = Path("/sys/devices/system/cpu")) -> int:
    """Physical cores this process may run on (hyper-threads counted once), from the ``sys_cpu``
    topology; half the logical CPUs (at least 1) where the topology cannot be read."""
    cpus, cores = _usable_cpus(), set()
    for cpu in cpus:
        topology = sys_cpu / f"cpu{cpu}" / "topology"
        try:
            cores.add(((topology / "physical_package_id").read_text().strip(),
                       (topology / "core_id").read_text().strip()))
        except OSError:
            return max(1, len(cpus) // 2)
    return max(1, len(cores))


def default_threads() -> int:
    """Physical cores (at most :data:`MAX_THREADS`) less those other processes keep busy (the 1-minute
    load average), at least 1: on a loaded machine, fewer threads than cores avoids oversubscription,
    which slows torch down many times over."""
    cores = min(physical_cores(), MAX_THREADS)
    try:
        busy = int(os.getloadavg()[0])
    except OSError:
        busy = 0
    return max(1, cores - busy)


def set_threads(threads: int | None) -> int:
    """Set torch's intra-op threads (``--threads``, else :func:`default_threads`); return the count."""
    if threads is not None and threads < 1:
        raise CommandError(f"--threads must be at least 1, got {threads}")
    import torch

    count = threads or default_threads()
    torch.set_num_threads(count)
    return count


def check_device(name: str):
    """The torch device ``--device`` names; CommandError when it is malformed or not available here."""
    import torch

    try:
        device = torch.device(name)
    except (RuntimeError, ValueError) as err:
        raise CommandError(f"--device {name}: not a device name ({err})") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CommandError(f"--device {name}: CUDA is not available (no GPU, or torch {torch.__version__} "
                           "was built without CUDA)")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise CommandError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s)")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise CommandError(f"--device {name}: MPS is not available")
    return device


def progress_bar_options(desc: str) -> dict:
    """tqdm options: on stderr, only when it is a terminal, and only once work has run a second."""
    return {"desc": desc, "leave": False, "file": sys.stderr, "disable": not sys.stderr.isatty(), "delay": 1.0}
