"""LoRA call scales live in the calling thread's context: concurrent calls with different scales do not mix."""

from __future__ import annotations

import threading

import torch
from torch import nn

from diffusekit.loaders import lora_layers as layers


def _model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4))
    layers.add_adapter(model[0], "a", layers.Adapter(torch.randn(2, 4), torch.randn(4, 2), scale=1.0))
    model[0].lora_active = ("a",)
    layers.install_scale_hook(model)
    return model


class _Scaled(nn.Module):
    """A root model whose forward takes ``cross_attention_kwargs`` (as the UNet's does)."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = _model()

    def forward(self, x, cross_attention_kwargs=None):
        return self.inner(x)


def test_scales_of_concurrent_calls_stay_apart():
    model = _Scaled()
    layers.install_scale_hook(model)
    x = torch.randn(3, 4)
    base = model.inner[0]
    plain = nn.functional.linear(x, base.weight, base.bias)
    alone = {s: model(x, cross_attention_kwargs={"scale": s}) for s in (0.0, 0.5, 2.0)}
    assert torch.equal(alone[0.0], plain) and not torch.equal(alone[0.5], alone[2.0])
    barrier, results = threading.Barrier(3), {}

    def work(scale: float) -> None:
        with layers.lora_call_scale(model, scale):  # the text-encoder path: a scale held across a block
            barrier.wait(timeout=5)
            results[scale, "block"] = model.inner(x)
            barrier.wait(timeout=5)
        results[scale, "hook"] = model(x, cross_attention_kwargs={"scale": scale})

    workers = [threading.Thread(target=work, args=(s,)) for s in (0.0, 0.5, 2.0)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    assert all(torch.equal(results[s, kind], alone[s]) for s in alone for kind in ("block", "hook"))
    assert torch.equal(model(x), model(x, cross_attention_kwargs={"scale": 1.0}))  # nothing left behind
