"""Model CPU offload and the slicing/tiling switches of MemoryMixin, checked on the CPU by recording moves."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from diffusekit.pipelines import memory
from diffusekit.pipelines.memory import MemoryMixin
from diffusekit.pipelines.pipeline_utils import DiffusionPipeline

DEVICE = torch.device("meta", 0)  # inputs really move there; models move only in the recorder


class Part(nn.Module):
    """A model that records the device of its inputs and never touches its weights."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1))
        self.seen: list[str] = []
        self.slice = "unset"

    def forward(self, x):
        self.seen.append(x.device.type)
        return x


class Vae(Part):
    def __init__(self):
        super().__init__()
        self.use_slicing = self.use_tiling = False

    def encode(self, x):
        """Encode."""
        self.seen.append(x.device.type)
        return x

    def decode(self, z):
        self.seen.append(z.device.type)
        return z

    def enable_slicing(self):
        self.use_slicing = True

    def disable_slicing(self):
        self.use_slicing = False

    def enable_tiling(self):
        self.use_tiling = True

    def disable_tiling(self):
        self.use_tiling = False


class Unet(Part):
    def set_attention_slice(self, slice_size):
        self.slice = slice_size


class FakePipeline(DiffusionPipeline, MemoryMixin):
    _exclude_from_cpu_offload = ("safety_checker",)

    def __init__(self, text_encoder, unet, vae, safety_checker, scheduler=None):
        super().__init__()
        self.register_modules(text_encoder=text_encoder, unet=unet, vae=vae, safety_checker=safety_checker,
                              scheduler=scheduler)

    def __call__(self, steps: int = 2):
        device = self._execution_device
        x = torch.zeros(1, device=device)
        self.text_encoder(torch.zeros(1))
        self.vae.encode(torch.zeros(1))
        for _ in range(steps):
            x = self.unet(x)
        out = self.vae.decode(x)
        self.safety_checker(out)
        self.maybe_free_model_hooks()
        return out


@pytest.fixture
def moves(monkeypatch):
    """Replace the device move by a recorder: (model name, device type) per move."""
    record: list[tuple[nn.Module, str]] = []

    def record_move(module, device):
        record.append((module, torch.device(device).type))

    monkeypatch.setattr(memory, "move_module", record_move)
    return record


def make_pipe():
    return FakePipeline(text_encoder=Part(), unet=Unet(), vae=Vae(), safety_checker=Part())


def named(pipe, moves):
    names = {id(m): n for n, m in pipe.components.items() if m is not None}
    return [(names[id(m)], d) for m, d in moves]


def test_offload_moves_one_model_at_a_time_in_run_order(moves):
    pipe = make_pipe()
    pipe.enable_model_cpu_offload(device="meta")
    assert pipe._execution_device == DEVICE
    setup = named(pipe, moves)
    assert ("safety_checker", "meta") in setup
    assert sorted(n for n, d in setup if d == "cpu") == ["text_encoder", "unet", "vae"]
    moves.clear()

    pipe()
    assert named(pipe, moves) == [
        ("text_encoder", "meta"),
        ("text_encoder", "cpu"), ("vae", "meta"),
        ("vae", "cpu"), ("unet", "meta"),  # the unet moves once for all steps
        ("unet", "cpu"), ("vae", "meta"),
        ("vae", "cpu"),  # maybe_free_model_hooks at the end of the call
    ]
    on_device: set[str] = set()
    for name, device in named(pipe, moves):
        (on_device.add if device == "meta" else on_device.discard)(name)
        assert len(on_device) <= 1
    assert not on_device
    # inputs followed the models to the execution device
    assert pipe.text_encoder.seen == ["meta"] and pipe.vae.seen == ["meta", "meta"]
    assert pipe.unet.seen == ["meta", "meta"]


def test_second_call_repeats_and_remove_restores_methods(moves):
    pipe = make_pipe()
    pipe.enable_model_cpu_offload(device="meta")
    pipe()
    first = named(pipe, moves)
    moves.clear()
    pipe()
    assert named(pipe, moves) == first[-8:]
    assert pipe.vae.encode.__doc__ == "Encode."

    pipe.remove_all_hooks()
    moves.clear()
    assert "encode" not in pipe.vae.__dict__
    assert pipe._execution_device == torch.device("cpu")
    pipe.text_encoder(torch.zeros(1))
    pipe.vae.decode(torch.zeros(1))
    assert moves == []


def test_offload_device_arguments(moves):
    pipe = make_pipe()
    pipe.enable_model_cpu_offload(gpu_id=1, device="meta")
    assert pipe._execution_device == torch.device("meta", 1)
    with pytest.raises(ValueError, match="gpu_id"):
        pipe.enable_model_cpu_offload(gpu_id=1, device="meta:0")
    pipe.enable_model_cpu_offload(device="meta")  # re-enabling replaces the hooks instead of stacking them
    moves.clear()
    pipe.text_encoder(torch.zeros(1))
    assert len(moves) == 1


def test_offload_on_cpu_leaves_results_unchanged():
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    x = torch.randn(4, 3)
    expected = model(x)
    pipe = FakePipeline(text_encoder=model, unet=Unet(), vae=Vae(), safety_checker=Part())
    pipe.enable_model_cpu_offload(device="cpu")
    torch.testing.assert_close(pipe.text_encoder(x), expected)


def test_slicing_and_tiling_switches():
    pipe = make_pipe()
    pipe.enable_attention_slicing()
    assert pipe.unet.slice == "auto"
    pipe.enable_attention_slicing(2)
    assert pipe.unet.slice == 2
    pipe.disable_attention_slicing()
    assert pipe.unet.slice is None
    pipe.enable_vae_slicing()
    pipe.enable_vae_tiling()
    assert pipe.vae.use_slicing and pipe.vae.use_tiling
    pipe.disable_vae_slicing()
    pipe.disable_vae_tiling()
    assert not (pipe.vae.use_slicing or pipe.vae.use_tiling)
    no_vae = FakePipeline(text_encoder=Part(), unet=Unet(), vae=None, safety_checker=Part())
    with pytest.raises(ValueError, match="vae"):
        no_vae.enable_vae_slicing()


def test_offload_in_a_real_inpaint_pipeline(monkeypatch, tmp_path):
    """Offload 'to' cpu:0 in the inpainting pipeline: same image, models run one at a time in order;
    attention and VAE slicing leave the image unchanged too."""
    from PIL import Image
    from sd_components import SCHEDULER_CONFIG, UNET_CONFIG, VAE_CONFIG, tiny_text_encoder, tiny_tokenizer

    from diffusekit import AutoencoderKL, DDIMScheduler, StableDiffusionInpaintPipeline, UNet2DConditionModel

    tokenizer = tiny_tokenizer(tmp_path)
    torch.manual_seed(0)
    pipe = StableDiffusionInpaintPipeline(
        vae=AutoencoderKL(**VAE_CONFIG), text_encoder=tiny_text_encoder(tokenizer), tokenizer=tokenizer,
        unet=UNet2DConditionModel(**dict(UNET_CONFIG, in_channels=9)),
        scheduler=DDIMScheduler.from_config(SCHEDULER_CONFIG),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    image = Image.new("RGB", (32, 32), (200, 40, 90))
    mask = Image.new("L", (32, 32), 0)
    mask.paste(255, (8, 8, 24, 24))

    def run():
        return pipe("a cat", image=image, mask_image=mask, num_inference_steps=2, guidance_scale=3.0,
                    generator=torch.Generator().manual_seed(0), output_type="np").images

    expected = run()
    record = []
    real_move = memory.move_module
    monkeypatch.setattr(memory, "move_module", lambda m, d: (record.append((m, str(torch.device(d)))), real_move(m, d)))
    pipe.enable_model_cpu_offload(device="cpu")
    assert pipe._execution_device == torch.device("cpu", 0)
    record.clear()
    np.testing.assert_array_equal(run(), expected)
    names = {id(m): n for n, m in pipe.components.items() if m is not None}
    moves = [(names[id(m)], d) for m, d in record]
    assert [n for n, d in moves if d == "cpu:0"] == ["text_encoder", "vae", "unet", "vae"]
    assert moves[-1] == ("vae", "cpu") and pipe._offloader.active is None
    pipe.remove_all_hooks()

    pipe.enable_attention_slicing("max")
    pipe.enable_vae_slicing()
    sizes = {m.slice_size for m in pipe.unet.modules() if hasattr(m, "sliceable_head_dim")}
    assert sizes == {1} and pipe.vae.use_slicing
    np.testing.assert_allclose(run(), expected, atol=1e-5)
