"""``DiffusionPipeline.compile``: torch.compile of a pipeline's denoiser (``unet`` or ``transformer``).

- Full (``regional=False``): the denoiser's ``forward`` is compiled as one graph (``fullgraph=True``
  by default: a graph break is an error, not a silent slowdown). Module hooks (LoRA call scales,
  CPU offload) stay outside the graph, and the timestep reaches it as a float32 tensor whatever
  the scheduler gives (an int tensor, a Python number), so swapping schedulers does not recompile.
- Regional (``regional=True``, the default): each block of the classes in the model's
  ``_repeated_blocks`` is compiled on its own (``module.compile``); the blocks of one class and
  shape share one compiled graph, so compiling takes a fraction of the full compile's time. The
  code between the blocks runs eagerly.

Module objects, parameters and state-dict keys are unchanged (no ``_orig_mod.`` prefix), so LoRA
loading, ``save_pretrained`` and ``.to()`` keep working. What recompiles: a new input shape or
dtype, the first LoRA load (the layers change class; unloading returns to the graphs compiled
before), a change of adapter weights (``set_adapters``); none of these LoRA changes recompile after
``pipe.enable_lora_hotswap(target_rank=R)`` (fixed-shape LoRA buffers, loaders/lora_hotswap.py). Per-call LoRA scales
(``cross_attention_kwargs={"scale": s}``) live in a context variable that torch.compile cannot
read: a prepared model takes them through its scale buffers (``lora_layers.compiled_call_scale``),
one not prepared refuses scales other than 1.0 (set adapter weights instead).
``pipe.compile(whole_step=True)`` compiles whole denoising steps instead (:mod:`.whole_step`).

``fuse_qkv=True`` adds fused ``to_qkv`` / ``to_kv`` layers (extra state-dict keys; LoRA adapters on
``to_q`` / ``to_k`` / ``to_v`` are bypassed while fused): ``unfuse_qkv_projections()`` on the model
removes them. ``channels_last=True`` converts a UNet's weights to the channels-last memory format
(pays on CUDA, not on CPU).
"""

from __future__ import annotations

import functools
import inspect
from typing import Any, Callable

import torch
from torch import nn

#: Pipeline attributes that may hold the denoiser, in the order they are looked up.
DENOISER_NAMES = ("unet", "transformer")
#: Attribute set on a compiled denoiser: the settings it was compiled with (read by the LoRA scale hook).
COMPILED_ATTRIBUTE = "_diffusekit_compile"


def find_denoiser(pipe: Any) -> nn.Module:
    """The pipeline's ``unet`` or ``transformer``; ValueError when it has neither."""
    for name in DENOISER_NAMES:
        model = getattr(pipe, name, None)
        if isinstance(model, nn.Module):
            return model
    raise ValueError(f"{type(pipe).__name__} has no denoiser to compile (no {' or '.join(DENOISER_NAMES)})")


def repeated_blocks(model: nn.Module) -> list[nn.Module]:
    """The submodules whose class is named in ``model._repeated_blocks``; ValueError when there are none."""
    names = tuple(getattr(model, "_repeated_blocks", ()))
    blocks = [m for m in model.modules() if type(m).__name__ in names]
    if not blocks:
        raise ValueError(f"{type(model).__name__} has no repeated blocks to compile regionally "
                         f"(_repeated_blocks = {names}); use regional=False")
    return blocks


def float_timestep(forward: Callable, eager: Callable) -> Callable:
    """``forward`` (taking ``eager``'s arguments) with the ``timestep`` argument made a float32 tensor
    (exact for integer steps below 2**24); ``forward`` itself when ``eager`` takes no timestep."""
    names = list(inspect.signature(eager).parameters)
    if "timestep" not in names:
        return forward
    position = names.index("timestep")

    @functools.wraps(eager)
    def call(*args: Any, **kwargs: Any):
        like = next((v for v in (*args, *kwargs.values()) if torch.is_tensor(v)), None)
        if "timestep" in kwargs:
            kwargs["timestep"] = _as_float(kwargs["timestep"], like)
        elif len(args) > position:
            args = (*args[:position], _as_float(args[position], like), *args[position + 1:])
        return forward(*args, **kwargs)

    return call


def _as_float(timestep: Any, like: torch.Tensor | None) -> Any:
    if timestep is None:
        return None
    if not torch.is_tensor(timestep):
        device = like.device if torch.is_tensor(like) else None
        return torch.tensor(float(timestep), dtype=torch.float32, device=device)
    if timestep.is_floating_point():
        return timestep
    return timestep.float()


def reset_compiled(model: nn.Module) -> None:
    """Undo :func:`compile_denoiser`: eager forward and blocks again (fused QKV and memory format stay)."""
    model.__dict__.pop("forward", None)
    for module in model.modules():
        module._compiled_call_impl = None
    model.__dict__.pop(COMPILED_ATTRIBUTE, None)


def check_settings(mode: str | None, options: dict | None) -> None:
    if mode is not None and options is not None:
        raise ValueError("pass either mode or options to compile, not both")


def prepare_denoiser(model: nn.Module, *, channels_last: bool = False, fuse_qkv: bool = False) -> None:
    """Undo an earlier compilation, then fuse QKV projections and convert to channels-last as asked."""
    if fuse_qkv and not hasattr(model, "fuse_qkv_projections"):
        raise ValueError(f"fuse_qkv=True: {type(model).__name__} has no fuse_qkv_projections")
    reset_compiled(model)
    if fuse_qkv:
        model.fuse_qkv_projections()
    if channels_last:
        model.to(memory_format=torch.channels_last)


def compile_denoiser(model: nn.Module, *, mode: str | None = None, regional: bool = True,
                     backend: str | Callable = "inductor", fullgraph: bool = True, dynamic: bool | None = None,
                     options: dict | None = None, channels_last: bool = False, fuse_qkv: bool = False) -> nn.Module:
    """Compile ``model`` in place (see the module docstring); returns it. Compiling again replaces the
    previous compilation."""
    check_settings(mode, options)
    blocks = repeated_blocks(model) if regional else []  # checked before anything changes
    prepare_denoiser(model, channels_last=channels_last, fuse_qkv=fuse_qkv)
    settings = dict(mode=mode, backend=backend, fullgraph=fullgraph, dynamic=dynamic, options=options)
    if regional:
        for block in blocks:
            block.compile(**settings)
    else:
        bound = type(model).forward.__get__(model)
        model.forward = float_timestep(torch.compile(bound, **settings), bound)
    setattr(model, COMPILED_ATTRIBUTE, {**settings, "regional": regional})
    return model
