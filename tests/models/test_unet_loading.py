"""Loading the UNets: strict key/shape checks naming key and file, dtypes, variants, shards, pickles, no init."""

import json

import pytest
import torch
from safetensors.torch import save_file

from diffusekit.models.unet_2d import UNet2DModel
from diffusekit.models.unet_2d_condition import UNet2DConditionModel
from diffusekit.weights import WeightsError

UNET = dict(sample_size=8, block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8,
            attention_head_dim=8, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
            up_block_types=("AttnUpBlock2D", "UpBlock2D"))
COND = dict(sample_size=8, block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8,
            cross_attention_dim=12, attention_head_dim=2, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
WEIGHTS = "diffusion_pytorch_model.safetensors"


@pytest.fixture
def saved(tmp_path):
    torch.manual_seed(0)
    model = UNet2DModel(**UNET).eval()
    model.save_pretrained(tmp_path)
    return model, tmp_path


def run(model: UNet2DModel) -> torch.Tensor:
    sample = torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(0), dtype=model.dtype)
    with torch.no_grad():
        return model(sample, 5).sample


def test_round_trip(saved):
    model, folder = saved
    assert json.loads((folder / "config.json").read_text())["_class_name"] == "UNet2DModel"
    torch.testing.assert_close(run(UNet2DModel.from_pretrained(folder)), run(model), rtol=0, atol=0)


@pytest.mark.parametrize("change, expected", [
    (lambda s: s.pop("conv_out.bias"), "missing keys [conv_out.bias]"),
    (lambda s: s.update({"extra.weight": torch.zeros(1)}), "unexpected keys [extra.weight]"),
    (lambda s: s.update({"conv_in.bias": torch.zeros(3)}), "shape mismatch for key conv_in.bias in "),
])
def test_key_and_shape_errors_name_key_and_file(saved, change, expected):
    model, folder = saved
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    change(state)
    save_file(state, str(folder / WEIGHTS))
    with pytest.raises(WeightsError) as err:
        UNet2DModel.from_pretrained(folder)
    assert expected in str(err.value) and WEIGHTS in str(err.value)


def test_truncated_file_names_file(saved):
    _, folder = saved
    path = folder / WEIGHTS
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(WeightsError, match=f"{WEIGHTS}.*truncated"):
        UNet2DModel.from_pretrained(folder)


def test_float16_dtype_and_fp16_variant(saved, tmp_path_factory):
    model, folder = saved
    half = UNet2DModel.from_pretrained(folder, torch_dtype=torch.float16)
    assert all(p.dtype == torch.float16 for p in half.parameters())
    torch.testing.assert_close(run(half).float(), run(model), rtol=2e-2, atol=2e-2)

    variant_folder = tmp_path_factory.mktemp("variant")
    model.to(torch.float16).save_pretrained(variant_folder, variant="fp16")
    assert (variant_folder / "diffusion_pytorch_model.fp16.safetensors").is_file()
    loaded = UNet2DModel.from_pretrained(variant_folder, variant="fp16")
    assert loaded.dtype == torch.float16
    with pytest.raises(FileNotFoundError, match=WEIGHTS):
        UNet2DModel.from_pretrained(variant_folder)


def test_sharded_save_and_load(tmp_path):
    torch.manual_seed(0)
    model = UNet2DConditionModel(**COND).eval()
    model.save_pretrained(tmp_path, max_shard_size="60KB")
    index = json.loads((tmp_path / "diffusion_pytorch_model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    loaded = UNet2DConditionModel.from_pretrained(tmp_path)
    for (name, a), b in zip(loaded.state_dict().items(), model.state_dict().values()):
        assert torch.equal(a, b), name


def test_legacy_bin_with_weights_only(saved, tmp_path_factory):
    model, _ = saved
    folder = tmp_path_factory.mktemp("bin")
    model.save_pretrained(folder, safe_serialization=False)
    assert (folder / "diffusion_pytorch_model.bin").is_file()
    torch.testing.assert_close(run(UNet2DModel.from_pretrained(folder)), run(model), rtol=0, atol=0)
    torch.save({"state": object()}, folder / "diffusion_pytorch_model.bin")
    with pytest.raises(WeightsError, match="diffusion_pytorch_model.bin"):
        UNet2DModel.from_pretrained(folder)


def test_no_random_init_on_real_tensors(tmp_path, monkeypatch):
    torch.manual_seed(0)
    UNet2DConditionModel(**COND).save_pretrained(tmp_path)
    original = {name: getattr(torch.Tensor, name) for name in ("uniform_", "normal_")}

    def guard(name):
        def refuse(self, *args, **kwargs):
            if not self.is_meta:
                raise AssertionError(f"random initialisation ({name}) of a real tensor during from_pretrained")
            return original[name](self, *args, **kwargs)
        return refuse

    for name in original:
        monkeypatch.setattr(torch.Tensor, name, guard(name))
    loaded = UNet2DConditionModel.from_pretrained(tmp_path)
    assert not any(t.is_meta for t in [*loaded.parameters(), *loaded.buffers()])
