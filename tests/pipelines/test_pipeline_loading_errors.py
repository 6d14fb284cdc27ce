import json

import pytest

from diffusekit import DiffusionPipeline
from diffusekit.configuration import ConfigError


def test_folder_without_model_index(tmp_path):
    with pytest.raises(FileNotFoundError, match="model_index.json"):
        DiffusionPipeline.from_pretrained(tmp_path)


def test_malformed_model_index_names_the_file(tmp_path):
    (tmp_path / "model_index.json").write_text('{"_class_name": ')
    with pytest.raises(ConfigError, match="model_index.json"):
        DiffusionPipeline.from_pretrained(tmp_path)


def test_unknown_pipeline_class(tmp_path):
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "NoSuchPipeline"}))
    with pytest.raises(ValueError, match="NoSuchPipeline"):
        DiffusionPipeline.from_pretrained(tmp_path)


def test_unknown_component_class_names_component_and_file(tmp_path):
    index = {"_class_name": "DDPMPipeline", "unet": ["diffusers", "NoSuchModel"], "scheduler": ["diffusers", "X"]}
    (tmp_path / "model_index.json").write_text(json.dumps(index))
    (tmp_path / "unet").mkdir()
    with pytest.raises(ValueError, match=r"model_index.json.*unet.*NoSuchModel"):
        DiffusionPipeline.from_pretrained(tmp_path)


def test_missing_component_entry(tmp_path):
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "DDPMPipeline"}))
    with pytest.raises(ValueError, match="unet"):
        DiffusionPipeline.from_pretrained(tmp_path)


def _saved_ddpm(folder):
    import torch

    from diffusekit import DDPMPipeline, DDPMScheduler, UNet2DModel

    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=8, block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4,
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"))
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler()).save_pretrained(folder)
    return json.loads((folder / "model_index.json").read_text())


@pytest.mark.parametrize("entry, message", [
    ("UNet2DModel", "expected [library, class]"),
    (["UNet2DModel"], "expected [library, class]"),
    (["diffusers", None], "expected [library, class]"),
    (["diffusers", "importlib"], "unknown class 'importlib'"),
    (["diffusers", "randn_tensor"], "library 'diffusers' has no loadable class 'randn_tensor'"),
    (["os", "UNet2DModel"], "library 'os' has no loadable class 'UNet2DModel'"),
    (["transformers", "pipeline"], "transformers has no loadable class 'pipeline'"),
])
def test_malformed_component_entries_name_file_and_component(tmp_path, entry, message):
    index = _saved_ddpm(tmp_path)
    (tmp_path / "model_index.json").write_text(json.dumps({**index, "unet": entry}))
    with pytest.raises(ValueError) as err:
        DiffusionPipeline.from_pretrained(tmp_path)
    assert "model_index.json (component 'unet')" in str(err.value) and message in str(err.value)


def test_null_component_means_absent_and_known_libraries_load(tmp_path):
    index = _saved_ddpm(tmp_path)
    (tmp_path / "model_index.json").write_text(json.dumps({**index, "unet": [None, None]}))
    assert DiffusionPipeline.from_pretrained(tmp_path).unet is None
    (tmp_path / "model_index.json").write_text(json.dumps({**index, "unet": ["diffusekit", "UNet2DModel"]}))
    assert type(DiffusionPipeline.from_pretrained(tmp_path).unet).__name__ == "UNet2DModel"


def test_component_config_of_another_class_is_refused(tmp_path):
    index = _saved_ddpm(tmp_path)
    (tmp_path / "model_index.json").write_text(json.dumps({**index, "unet": ["diffusers", "UNet2DConditionModel"]}))
    expected = r"unet/config.json is the config of 'UNet2DModel', not of 'UNet2DConditionModel'"
    with pytest.raises(ValueError, match=expected):
        DiffusionPipeline.from_pretrained(tmp_path)
