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
