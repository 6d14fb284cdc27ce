import json

import pytest
import torch

from diffusekit.weights import WeightsError
from helpers import TinyModel, tiny_model


def test_round_trip_gives_identical_output(tmp_path):
    model = tiny_model()
    model.save_pretrained(tmp_path)
    assert (tmp_path / "diffusion_pytorch_model.safetensors").is_file()
    assert json.loads((tmp_path / "config.json").read_text())["_class_name"] == "TinyModel"
    loaded = TinyModel.from_pretrained(tmp_path)
    x = torch.randn(1, 3, 5, 5)
    torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)
    assert not loaded.training


def test_load_does_no_random_init(tmp_path):
    from torch.overrides import TorchFunctionMode

    tiny_model().save_pretrained(tmp_path)

    class InitSpy(TorchFunctionMode):
        def __init__(self):
            super().__init__()
            self.calls = []

        def __torch_function__(self, func, types, args=(), kwargs=None):
            if getattr(func, "__module__", "") == "torch.nn.init":
                self.calls.append(func.__name__)
            return func(*args, **(kwargs or {}))

    with InitSpy() as spy:
        tiny_model()
    assert spy.calls, "the spy sees initialisation when it runs"
    with InitSpy() as spy:
        loaded = TinyModel.from_pretrained(tmp_path)
    assert spy.calls == []
    assert not any(p.is_meta for p in loaded.parameters())


def test_dtype_variant_and_shards(tmp_path):
    model = tiny_model(hidden=16)
    model.save_pretrained(tmp_path / "v", variant="fp16")
    assert (tmp_path / "v" / "diffusion_pytorch_model.fp16.safetensors").is_file()
    half = TinyModel.from_pretrained(tmp_path / "v", variant="fp16", torch_dtype=torch.float16)
    assert half.dtype == torch.float16
    with pytest.raises(FileNotFoundError, match="diffusion_pytorch_model.safetensors") as error:
        TinyModel.from_pretrained(tmp_path / "v")
    assert str(error.value).startswith("Error no file named diffusion_pytorch_model.bin found in directory")

    model.save_pretrained(tmp_path / "s", max_shard_size=600)
    index = json.loads((tmp_path / "s" / "diffusion_pytorch_model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    sharded = TinyModel.from_pretrained(tmp_path / "s")
    for a, b in zip(sharded.parameters(), model.parameters()):
        assert torch.equal(a, b)


def test_legacy_bin_is_read_with_weights_only(tmp_path):
    model = tiny_model()
    model.save_pretrained(tmp_path, safe_serialization=False)
    assert (tmp_path / "diffusion_pytorch_model.bin").is_file()
    loaded = TinyModel.from_pretrained(tmp_path)
    assert torch.equal(loaded.conv_in.weight, model.conv_in.weight)


def _resave(folder, state):
    from safetensors.torch import save_file

    save_file(state, str(folder / "diffusion_pytorch_model.safetensors"))


def test_missing_unexpected_and_shape_errors_name_keys_and_file(tmp_path):
    model = tiny_model()
    model.save_pretrained(tmp_path)
    state = dict(model.state_dict())
    state.pop("conv_out.bias")
    state["extra.weight"] = torch.zeros(1)
    state["conv_in.bias"] = torch.zeros(99)
    _resave(tmp_path, state)
    with pytest.raises(WeightsError) as err:
        TinyModel.from_pretrained(tmp_path)
    message = str(err.value)
    for piece in ("diffusion_pytorch_model.safetensors", "conv_out.bias", "extra.weight", "conv_in.bias"):
        assert piece in message


def test_truncated_and_lying_safetensors_are_clear_errors(tmp_path):
    tiny_model().save_pretrained(tmp_path)
    path = tmp_path / "diffusion_pytorch_model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 40])
    with pytest.raises(WeightsError, match="diffusion_pytorch_model.safetensors.*truncated"):
        TinyModel.from_pretrained(tmp_path)
    path.write_bytes((10**12).to_bytes(8, "little") + data[8:])
    with pytest.raises(WeightsError, match="header claims"):
        TinyModel.from_pretrained(tmp_path)
    path.write_bytes(data[:3])
    with pytest.raises(WeightsError, match="truncated"):
        TinyModel.from_pretrained(tmp_path)
    header_len = int.from_bytes(data[:8], "little")
    path.write_bytes(data[:8] + b"{" * header_len + data[8 + header_len:])
    with pytest.raises(WeightsError, match="corrupt"):
        TinyModel.from_pretrained(tmp_path)


def test_malformed_config_names_file(tmp_path):
    tiny_model().save_pretrained(tmp_path)
    (tmp_path / "config.json").write_text("{oops")
    with pytest.raises(ValueError, match="config.json"):
        TinyModel.from_pretrained(tmp_path)


def test_skip_init_skips_initialisation_in_this_thread_only():
    import threading

    from torch import nn

    from diffusekit.models import layers
    from diffusekit.models.modeling import skip_init

    before = (nn.Linear.reset_parameters, torch.nn.init.normal_, torch.nn.init.kaiming_uniform_)
    elsewhere = {}

    def build_elsewhere():
        torch.manual_seed(1)
        elsewhere["layer"] = layers.Linear(2, 3)

    with skip_init(device="meta"):
        assert (nn.Linear.reset_parameters, torch.nn.init.normal_, torch.nn.init.kaiming_uniform_) == before
        assert torch.nn.init.constant_(torch.zeros(1), 3.0).item() == 3.0  # torch itself untouched
        inside = [layers.Linear(2, 3), layers.Conv2d(2, 3, 3), layers.GroupNorm(1, 2), layers.LayerNorm(4),
                  layers.RMSNorm(4), layers.Embedding(5, 2), layers.Conv1d(2, 3, 3), layers.ConvTranspose2d(2, 3, 2)]
        on_cpu = layers.Linear(2, 3, device="cpu")  # a device named by the caller wins
        worker = threading.Thread(target=build_elsewhere)
        worker.start()
        worker.join()
    assert all(p.is_meta for layer in inside for p in layer.parameters())
    assert not on_cpu.weight.is_meta
    torch.manual_seed(1)
    plain = nn.Linear(2, 3)
    assert not elsewhere["layer"].weight.is_meta
    assert torch.equal(elsewhere["layer"].weight, plain.weight)  # the other thread initialised as torch does
    assert isinstance(elsewhere["layer"], nn.Linear)
    torch.manual_seed(2)
    ours = layers.Conv2d(3, 4, 3)
    torch.manual_seed(2)
    theirs = nn.Conv2d(3, 4, 3)
    assert torch.equal(ours.weight, theirs.weight) and torch.equal(ours.bias, theirs.bias)


def test_safetensors_read_over_memory_map_matches_reader_and_leaves_file_alone(tmp_path):
    from safetensors.torch import load_file, save_file

    from diffusekit.weights import load_safetensors

    tensors = {"a": torch.randn(3, 4), "scalar": torch.tensor(2.5), "empty": torch.zeros(0, 3),
               "half": torch.randn(5).half(), "mask": torch.tensor([True, False]), "index": torch.arange(7)}
    path = tmp_path / "x.safetensors"
    save_file(tensors, str(path))
    loaded, reference = load_safetensors(path), load_file(str(path))
    assert list(loaded) == list(reference)
    for key, tensor in tensors.items():
        assert loaded[key].dtype == tensor.dtype and loaded[key].stride() == reference[key].stride()
        assert loaded[key].untyped_storage().nbytes() == reference[key].untyped_storage().nbytes()
        torch.testing.assert_close(loaded[key], tensor, rtol=0, atol=0)
    loaded["a"].add_(1)  # private mapping: the file keeps its bytes
    torch.testing.assert_close(load_file(str(path))["a"], tensors["a"], rtol=0, atol=0)
