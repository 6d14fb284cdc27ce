import json

import pytest

from diffusekit.configuration import ConfigError, ConfigMixin, FrozenDict, read_json, register_to_config


class Thing(ConfigMixin):
    config_name = "thing.json"

    @register_to_config
    def __init__(self, width: int = 4, depth: int = 2, names=("a", "b")):
        self.width = width


def test_arguments_become_frozen_config():
    thing = Thing(8, names=["x"])
    assert {k: v for k, v in thing.config.items() if not k.startswith("_")} == {"width": 8, "depth": 2, "names": ["x"]}
    assert thing.config._use_default_values == ["depth"]
    assert thing.config.width == 8
    with pytest.raises(TypeError, match="frozen"):
        thing.config["width"] = 3
    with pytest.raises(TypeError, match="frozen"):
        thing.config.width = 3


def test_from_config_overrides_and_keeps_unknown_keys(caplog):
    thing = Thing.from_config({"width": 3, "future_key": 1, "_class_name": "Thing"}, depth=5)
    assert (thing.config.width, thing.config.depth) == (3, 5)
    assert thing.config.future_key == 1
    assert "future_key" in caplog.text


def test_save_and_load_round_trip(tmp_path):
    thing = Thing(width=6)
    path = thing.save_config(tmp_path)
    data = json.loads(path.read_text())
    assert data["_class_name"] == "Thing" and data["_diffusers_version"]
    again = Thing.from_config(Thing.load_config(tmp_path))
    public = lambda config: {k: v for k, v in config.items() if k != "_use_default_values"}  # noqa: E731
    assert public(again.config) == public(thing.config)
    assert "_use_default_values" not in data
    assert "Thing" in repr(thing) and '"width": 6' in repr(thing)


def test_malformed_json_names_the_file(tmp_path):
    bad = tmp_path / "thing.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match="thing.json"):
        read_json(bad)
    assert isinstance(FrozenDict(a=1), dict)
