"""Hostile or odd weights and config files: each is refused with an error naming the file and the
key or field at fault; loaded tensors are 64-byte aligned, so they compute like fresh ones."""

import json
import os
import struct
import threading

import pytest
import torch
from safetensors.torch import save_file

from diffusekit.configuration import ConfigError, read_json
from diffusekit.models.unet_2d import UNet2DModel
from diffusekit.weights import (SAFETENSORS_NAME, WeightsError, check_safetensors_header, load_safetensors,
                                load_sharded, save_weights)
from helpers import TinyModel, tiny_model

WEIGHTS = "diffusion_pytorch_model.safetensors"
INDEX = "diffusion_pytorch_model.safetensors.index.json"


def write_raw(path, header: dict, data: bytes) -> None:
    """A safetensors file with exactly this header and data (no checks)."""
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)


def in_thread(function, timeout: float = 10.0):
    """``function()``'s exception (None if it returned); fails the test if it does not finish in time."""
    outcome = {}

    def target():
        try:
            function()
        except BaseException as err:  # noqa: BLE001 - handed to the test
            outcome["error"] = err

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(timeout)
    assert not thread.is_alive(), f"{function} still running after {timeout} s (blocked on the file?)"
    return outcome.get("error")


# -- alignment ------------------------------------------------------------------------------------

def test_every_loaded_tensor_is_aligned_and_the_round_trip_is_exact(tmp_path):
    torch.manual_seed(0)
    model = UNet2DModel(sample_size=8, block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8,
                        attention_head_dim=8, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                        up_block_types=("AttnUpBlock2D", "UpBlock2D")).eval()
    model.save_pretrained(tmp_path / "ours")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "reference.safetensors"))
    sample = torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(sample, 5).sample
    for state in (UNet2DModel.from_pretrained(tmp_path / "ours").state_dict(),
                  load_safetensors(tmp_path / "reference.safetensors")):
        unaligned = [k for k, v in state.items() if v.data_ptr() % 64]
        assert unaligned == []
        loaded = UNet2DModel.from_config(model.config).eval()
        loaded.load_checked_state_dict(state)
        with torch.no_grad():
            assert torch.equal(loaded(sample, 5).sample, expected)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_stays_mapped_and_computes_like_fresh_tensors(tmp_path, dtype):
    """Why only float32/float64 are copied: the half-precision kernels give the same bits on unaligned
    weights (if a torch release changes that, this fails and ALIGNMENT_SENSITIVE must grow)."""
    torch.manual_seed(0)
    model = UNet2DModel(sample_size=8, block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8,
                        attention_head_dim=8, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                        up_block_types=("AttnUpBlock2D", "UpBlock2D")).eval().to(dtype)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "reference.safetensors"))
    state = load_safetensors(tmp_path / "reference.safetensors")
    assert [k for k, v in state.items() if v.data_ptr() % 64]  # mapped where the file puts them
    loaded = UNet2DModel.from_config(model.config).eval().to(dtype)
    loaded.load_checked_state_dict(state)
    sample = torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(0)).to(dtype)
    with torch.no_grad():
        assert torch.equal(loaded(sample, 5).sample, model(sample, 5).sample)


def test_our_layout_maps_the_large_tensors_without_copying(tmp_path):
    torch.manual_seed(0)
    state = {"big": torch.randn(64, 16), "odd": torch.randn(3), "big2": torch.randn(32)}
    (path,) = save_weights(state, tmp_path)
    assert path.name == SAFETENSORS_NAME
    header = check_safetensors_header(path)
    header_len = struct.unpack("<Q", path.read_bytes()[:8])[0]
    assert (8 + header_len) % 64 == 0 and header["odd"]["data_offsets"][0] == 64 * 16 * 4 + 32 * 4
    loaded = load_safetensors(path)
    # mapped tensors sit at (map base + file offset): the same base for both large tensors
    bases = {loaded[k].data_ptr() - header[k]["data_offsets"][0] for k in ("big", "big2")}
    assert len(bases) == 1
    assert all(torch.equal(loaded[k], v) for k, v in state.items())


# -- hostile safetensors --------------------------------------------------------------------------

@pytest.mark.parametrize("header, data, message", [
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
      "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, bytes(12), "tensors 'a' and 'b' overlap"),
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, bytes(12), "4 trailing bytes after the last"),
    ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}, bytes(8), "bytes 0..4 before tensor 'a'"),
    ({"__metadata__": {"format": 1}, "a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, bytes(4),
     "__metadata__ field 'format' must be a string"),
    ({"__metadata__": ["x"]}, b"", "__metadata__ must be an object"),
    ({"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, bytes(8),
     "tensor 'a' of shape [3] and dtype F32 needs 12 bytes, but its offsets span 8"),
])
def test_lying_headers_are_refused(tmp_path, header, data, message):
    path = tmp_path / "hostile.safetensors"
    write_raw(path, header, data)
    with pytest.raises(WeightsError) as err:
        load_safetensors(path)
    assert str(path) in str(err.value) and message in str(err.value)
    assert "truncated" not in str(err.value)


@pytest.mark.parametrize("shard", ["../outside.safetensors", "/abs/outside.safetensors", "sub/x.safetensors", ".."])
def test_index_cannot_name_a_file_outside_the_folder(tmp_path, shard):
    folder = tmp_path / "model"
    folder.mkdir()
    save_file({"conv_in.weight": torch.zeros(1)}, str(tmp_path / "outside.safetensors"))
    (folder / INDEX).write_text(json.dumps({"weight_map": {"conv_in.weight": shard}}))
    with pytest.raises(WeightsError) as err:
        load_sharded(folder / INDEX)
    assert INDEX in str(err.value) and repr(shard) in str(err.value)


def test_shape_and_dtype_mismatches_name_key_and_file(tmp_path):
    tiny_model().save_pretrained(tmp_path)
    path = tmp_path / WEIGHTS
    state = load_safetensors(path, copy=True)
    save_file({**state, "conv_in.bias": torch.zeros(5)}, str(path))
    with pytest.raises(WeightsError) as err:
        TinyModel.from_pretrained(tmp_path)
    assert f"shape mismatch for key conv_in.bias in {path}: expected (8,), got (5,)" in str(err.value)
    save_file({**state, "conv_in.weight": state["conv_in.weight"].to(torch.int32)}, str(path))
    for dtype in (None, torch.float16):
        with pytest.raises(WeightsError) as err:
            TinyModel.from_pretrained(tmp_path, torch_dtype=dtype)
        assert (f"dtype mismatch for key conv_in.weight in {path}: expected torch.float32, got torch.int32"
                in str(err.value))


def test_float_dtypes_in_the_file_are_converted(tmp_path):
    model = tiny_model()
    model.to(torch.float16).save_pretrained(tmp_path)
    loaded = TinyModel.from_pretrained(tmp_path, torch_dtype=torch.float32)
    assert loaded.dtype == torch.float32
    assert torch.equal(loaded.conv_in.weight, model.conv_in.weight.float())


# -- files that are not regular files -------------------------------------------------------------

def test_config_fifo_is_refused_without_blocking(tmp_path):
    tiny_model().save_pretrained(tmp_path)
    (tmp_path / "config.json").unlink()
    os.mkfifo(tmp_path / "config.json")
    err = in_thread(lambda: TinyModel.from_pretrained(tmp_path))
    assert isinstance(err, ConfigError) and "config.json is not a regular file" in str(err)


def test_weights_fifo_is_refused_without_blocking(tmp_path):
    os.mkfifo(tmp_path / "w.safetensors")
    err = in_thread(lambda: load_safetensors(tmp_path / "w.safetensors"))
    assert isinstance(err, WeightsError) and "w.safetensors is not a regular file" in str(err)


def test_config_symlink_to_a_device_is_refused(tmp_path):
    tiny_model().save_pretrained(tmp_path)
    (tmp_path / "config.json").unlink()
    (tmp_path / "config.json").symlink_to("/dev/zero")
    with pytest.raises(ConfigError, match="config.json is not a regular file"):
        TinyModel.from_pretrained(tmp_path)


def test_symlink_to_a_regular_file_is_read(tmp_path):
    """Hub caches are symlinks to blobs: those still load."""
    (tmp_path / "blob").write_text('{"a": 1}')
    (tmp_path / "config.json").symlink_to(tmp_path / "blob")
    assert read_json(tmp_path / "config.json") == {"a": 1}


def test_json_over_the_size_cap_is_refused_unread(tmp_path):
    path = tmp_path / "config.json"
    with open(path, "wb") as f:
        f.truncate(16 * 1024 * 1024 + 1)  # sparse: nothing to read if the check comes first
    with pytest.raises(ConfigError, match=r"config.json is 16777217 bytes, over the 16777216-byte limit"):
        read_json(path)


# -- config of another class ------------------------------------------------------------------------

def test_config_of_another_model_class_is_refused(tmp_path):
    tiny_model().save_pretrained(tmp_path)
    with pytest.raises(ValueError) as err:
        UNet2DModel.from_pretrained(tmp_path)
    assert "config.json" in str(err.value) and "'TinyModel'" in str(err.value) and "'UNet2DModel'" in str(err.value)


def test_config_without_class_name_loads(tmp_path):
    model = tiny_model()
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    del config["_class_name"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert torch.equal(TinyModel.from_pretrained(tmp_path).conv_out.bias, model.conv_out.bias)
