"""ControlNetModel.from_single_file: the original layout (bare and inside a full checkpoint), our
layout, configs from folders, dicts and the shipped SD 1.5 config."""

import pytest
import torch
from safetensors.torch import save_file

from controlnet_files import original_controlnet_state
from diffusekit import ControlNetModel
from diffusekit.loaders.single_file_layout import controlnet_name_map, to_original
from diffusekit.loaders.single_file_model import CONFIG_ROOT
from diffusekit.models.modeling import skip_init
from diffusekit.weights import WeightsError

NET = dict(block_out_channels=(4, 8), layers_per_block=1, cross_attention_dim=8, norm_num_groups=2,
           down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), attention_head_dim=2,
           conditioning_embedding_out_channels=(4, 8, 8))


def _net(**overrides):
    torch.manual_seed(0)
    net = ControlNetModel(**{**NET, **overrides})
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    return net.eval()


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cn")
    net = _net()
    net.save_pretrained(folder / "controlnet")
    return net, folder


def _same(a, b):
    assert a.state_dict().keys() == b.state_dict().keys()
    for key, tensor in a.state_dict().items():
        assert torch.equal(tensor, b.state_dict()[key]), key


def test_original_layout_equals_the_folder_load(saved, tmp_path):
    net, folder = saved
    path = tmp_path / "control_tiny.safetensors"
    save_file(original_controlnet_state(net.state_dict(), dict(net.config)), str(path))
    from_folder = ControlNetModel.from_pretrained(folder / "controlnet")
    _same(ControlNetModel.from_single_file(path, config=folder / "controlnet"), from_folder)
    _same(ControlNetModel.from_single_file(path, config=folder), from_folder)  # a pipeline folder: controlnet/
    _same(ControlNetModel.from_single_file(path, config=dict(net.config)), from_folder)


def test_full_checkpoint_prefix_and_our_layout(saved, tmp_path):
    net, folder = saved
    full = original_controlnet_state(net.state_dict(), dict(net.config), prefix="control_model.")
    full["model.diffusion_model.out.2.weight"] = torch.zeros(1)  # the rest of a full checkpoint is ignored
    save_file(full, str(tmp_path / "full.safetensors"))
    _same(ControlNetModel.from_single_file(tmp_path / "full.safetensors", config=folder / "controlnet"), net)
    save_file(dict(net.state_dict()), str(tmp_path / "ours.safetensors"))
    loaded = ControlNetModel.from_single_file(tmp_path / "ours.safetensors", config=folder / "controlnet",
                                              torch_dtype=torch.float16)
    assert loaded.dtype == torch.float16


def test_conditioning_channels_come_from_the_file(tmp_path, saved):
    _, folder = saved
    gray = _net(conditioning_channels=1)
    save_file(original_controlnet_state(gray.state_dict(), dict(gray.config)), str(tmp_path / "gray.safetensors"))
    loaded = ControlNetModel.from_single_file(tmp_path / "gray.safetensors", config=folder / "controlnet")
    assert loaded.config.conditioning_channels == 1
    _same(loaded, gray)


def test_errors_name_the_file_and_config(saved, tmp_path):
    net, folder = saved
    path = tmp_path / "tiny.safetensors"
    save_file(original_controlnet_state(net.state_dict(), dict(net.config)), str(path))
    with pytest.raises(WeightsError, match=r"tiny\.safetensors.*ControlNet weights do not fit"):
        ControlNetModel.from_single_file(path)  # the shipped SD 1.5 config is far larger
    with pytest.raises(FileNotFoundError, match="controlnet subfolder"):
        ControlNetModel.from_single_file(path, config=tmp_path / "nowhere")
    wide = {"input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": torch.zeros(4, 2048)}
    save_file(wide, str(tmp_path / "xl.safetensors"))
    with pytest.raises(ValueError, match="no shipped ControlNet config for a sdxl checkpoint"):
        ControlNetModel.from_single_file(tmp_path / "xl.safetensors")


def test_shipped_sd15_config_maps_to_the_original_names():
    config = ControlNetModel.load_config(CONFIG_ROOT / "controlnet_sd1")
    with skip_init(device="meta"):
        net = ControlNetModel.from_config(config)
    names = controlnet_name_map(dict(net.config))
    originals = [to_original(key, names) for key in net.state_dict()]
    assert None not in originals and len(set(originals)) == len(originals)
    for known in ("input_hint_block.14.weight", "zero_convs.11.0.bias", "middle_block_out.0.weight",
                  "input_blocks.11.0.out_layers.3.weight", "input_blocks.3.0.op.weight",
                  "middle_block.1.transformer_blocks.0.attn2.to_k.weight", "time_embed.2.bias"):
        assert known in originals, known
    assert len(originals) == 340
