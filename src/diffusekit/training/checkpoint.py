"""Training checkpoints that resume exactly: tensors in safetensors files, everything else in JSON.

A checkpoint folder ``<out>/checkpoints/step-000500`` holds::

    unet/                       the model being trained (config.json + safetensors)
    ema.safetensors             the EMA weights
    optimizer.safetensors       the optimizer's per-parameter state tensors
    trainer_state.json          step, data position, optimizer groups, LR scheduler, grad scaler
    rng-<rank>.safetensors      torch / CUDA / sampling generator states of each process
    rng-<rank>.json             Python and numpy RNG states of each process
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from ..configuration import read_json
from .config import CLASS_LABELS_FILE, LOG_FILE, SAMPLES

STATE_FILE = "trainer_state.json"
CHECKPOINTS = "checkpoints"


def checkpoint_dir(out: Path, step: int) -> Path:
    return Path(out) / CHECKPOINTS / f"step-{step:07d}"


def find_checkpoint(path: str | Path) -> Path:
    """``path`` itself if it is a checkpoint, else the latest checkpoint of an output folder."""
    path = Path(path)
    if (path / STATE_FILE).is_file():
        return path
    found = sorted((path / CHECKPOINTS).glob("step-*/" + STATE_FILE))
    if not found:
        raise FileNotFoundError(f"--resume {path}: neither a checkpoint ({STATE_FILE}) nor a folder with {CHECKPOINTS}/")
    return found[-1].parent


def resumed_settings(resume: str | Path) -> dict:
    """The TrainConfig settings (JSON form) saved with the checkpoint that ``resume`` names."""
    return read_json(find_checkpoint(resume) / STATE_FILE).get("config", {})


def prepare_output(out: str | Path, resume: str | Path | None = None, overwrite: bool = False) -> None:
    """Refuse a non-empty ``out`` unless the run resumes from inside it or ``overwrite`` is set;
    with ``overwrite``, remove what an earlier run wrote there (its model, checkpoints, samples, log
    and class names; other files stay)."""
    out = Path(out)
    if not out.exists():
        return
    if not out.is_dir():
        raise ValueError(f"--out {out}: exists and is not a folder")
    if not any(out.iterdir()):
        return
    if resume is not None and Path(resume).resolve().is_relative_to(out.resolve()):
        return  # continuing the run in its own folder
    if not overwrite:
        raise ValueError(f"--out {out}: the folder exists and is not empty; pass --overwrite to replace "
                         "the run in it, or choose a new folder")

    for name in ("model_index.json", "unet", "scheduler", "vae", "text_encoder", "tokenizer", "config.json",
                 "diffusion_pytorch_model.safetensors", CHECKPOINTS, SAMPLES, LOG_FILE, CLASS_LABELS_FILE):
        path = out / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


# -- optimizer --------------------------------------------------------------------------------------

def split_optimizer_state(state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """An optimizer state_dict as (tensors for safetensors, JSON-ready rest)."""
    tensors, plain = {}, {}
    for index, values in state["state"].items():
        for key, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{index}.{key}"] = value.detach().cpu().contiguous()
            else:
                plain.setdefault(str(index), {})[key] = value
    groups = [{k: list(v) if isinstance(v, tuple) else v for k, v in g.items()} for g in state["param_groups"]]
    return tensors, {"scalars": plain, "param_groups": groups}


def join_optimizer_state(tensors: dict[str, torch.Tensor], rest: dict) -> dict:
    """Inverse of :func:`split_optimizer_state`."""
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        index, key = name.split(".", 1)
        state.setdefault(int(index), {})[key] = value
    for index, values in rest["scalars"].items():
        state.setdefault(int(index), {}).update(values)
    groups = [{k: tuple(v) if isinstance(v, list) and k != "params" else v for k, v in g.items()}
              for g in rest["param_groups"]]
    return {"state": state, "param_groups": groups}


# -- random number generators -----------------------------------------------------------------------

def rng_states(generators: dict[str, torch.Generator]) -> tuple[dict[str, torch.Tensor], dict]:
    """This process's RNG states: (tensors, JSON-ready)."""
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda.{i}"] = state
    for name, generator in generators.items():
        tensors[f"generator.{name}"] = generator.get_state()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss = random.getstate()
    plain = {"numpy": [kind, keys.tolist(), pos, has_gauss, cached], "python": [version, list(internal), gauss]}
    return tensors, plain


def restore_rng_states(tensors: dict[str, torch.Tensor], plain: dict, generators: dict[str, torch.Generator]) -> None:
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("cuda."))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda[: torch.cuda.device_count()])
    for name, generator in generators.items():
        generator.set_state(tensors[f"generator.{name}"])
    kind, keys, pos, has_gauss, cached = plain["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    version, internal, gauss = plain["python"]
    random.setstate((version, tuple(internal), gauss))


# -- whole checkpoints ------------------------------------------------------------------------------

def save_process_rng(folder: Path, rank: int, generators: dict[str, torch.Generator]) -> None:
    tensors, plain = rng_states(generators)
    save_file(tensors, str(folder / f"rng-{rank}.safetensors"))
    (folder / f"rng-{rank}.json").write_text(json.dumps(plain), encoding="utf-8")


def load_process_rng(folder: Path, rank: int, generators: dict[str, torch.Generator]) -> None:
    path = folder / f"rng-{rank}.safetensors"
    if not path.is_file():  # resumed on more processes than saved: fall back to rank 0's states
        path, rank = folder / "rng-0.safetensors", 0
    restore_rng_states(load_file(str(path)), read_json(folder / f"rng-{rank}.json"), generators)


def save_checkpoint(folder: Path, *, model, ema_state: dict[str, torch.Tensor], optimizer_state: dict,
                    trainer_state: dict) -> None:
    """Write the shared part of a checkpoint (call on the main process; RNG files are per process)."""
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder / "unet")
    save_file({k: v.detach().cpu().contiguous() for k, v in ema_state.items()}, str(folder / "ema.safetensors"))
    tensors, rest = split_optimizer_state(optimizer_state)
    save_file(tensors, str(folder / "optimizer.safetensors"))
    state = dict(trainer_state, optimizer=rest)
    (folder / STATE_FILE).write_text(json.dumps(state, indent=1), encoding="utf-8")


def load_checkpoint(folder: Path) -> tuple[dict[str, torch.Tensor], dict, dict]:
    """(ema_state, optimizer_state, trainer_state) of a checkpoint; the model loads from ``folder/unet``."""
    trainer_state = read_json(folder / STATE_FILE)
    optimizer_state = join_optimizer_state(load_file(str(folder / "optimizer.safetensors")),
                                           trainer_state.pop("optimizer"))
    return load_file(str(folder / "ema.safetensors")), optimizer_state, trainer_state
