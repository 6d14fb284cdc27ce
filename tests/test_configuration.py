import json
import warnings

import pytest
import torch

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
    public = lambda config: {k: v for k, v in config.items() if not k.startswith("_")}  # noqa: E731
    assert public(again.config) == public(thing.config)
    assert again.config._class_name == "Thing" and again.config._diffusers_version == data["_diffusers_version"]
    assert "_use_default_values" not in data
    assert "Thing" in repr(thing) and '"width": 6' in repr(thing)


def test_malformed_json_names_the_file(tmp_path):
    bad = tmp_path / "thing.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match="thing.json"):
        read_json(bad)
    assert isinstance(FrozenDict(a=1), dict)


class Widget(ConfigMixin):
    config_name = "widget.json"
    ignore_for_config = ("callback",)

    @register_to_config
    def __init__(self, size: int, depth: int = 2, callback=None, scale: float = 1.0):
        self.callback = callback


def _deprecation_message(cls: str, name: str, example: str) -> str:
    return (f"Accessing config attribute `{name}` directly via '{cls}' object attribute is deprecated. Please access "
            f"'{name}' over '{cls}'s config object instead, e.g. '{example}.config.{name}'.")


def test_config_values_read_as_attributes_warn_like_the_reference():
    thing = Thing(8)
    with pytest.warns(FutureWarning) as record:
        assert thing.depth == 2
    assert str(record[0].message) == _deprecation_message("Thing", "depth", "scheduler")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert thing.width == 8  # a real attribute: no warning
    with pytest.raises(AttributeError, match="'Thing' object has no attribute 'missing'"):
        thing.missing
    with pytest.raises(AttributeError):
        thing._use_default_values


def test_model_config_attributes_warn_and_modules_still_resolve():
    from diffusekit import UNet2DModel

    unet = UNet2DModel(block_out_channels=(4,), down_block_types=("DownBlock2D",), up_block_types=("UpBlock2D",),
                       norm_num_groups=4, layers_per_block=1, sample_size=8)
    with pytest.warns(FutureWarning) as record:
        assert unet.in_channels == 3 and unet.sample_size == 8
    assert str(record[0].message) == _deprecation_message("UNet2DModel", "in_channels", "unet")
    assert isinstance(unet.conv_in, torch.nn.Conv2d)
    with pytest.raises(AttributeError, match="no attribute 'not_there'"):
        unet.not_there


def test_register_to_config_records_positional_defaults_and_private_arguments():
    widget = Widget(5, callback=print, _class_name="Widget", _diffusers_version="0.30.0")
    public = {k: v for k, v in widget.config.items() if not k.startswith("_")}
    assert public == {"size": 5, "depth": 2, "scale": 1.0}
    assert sorted(widget.config._use_default_values) == ["depth", "scale"]
    assert widget.config._diffusers_version == "0.30.0" and widget.callback is print
    with pytest.raises(TypeError):
        Widget()  # the required argument is still required


def test_register_to_config_follows_the_decorated_signature():
    class Narrow(Widget):
        def __init__(self, depth: int):
            super().__init__(7, depth)

    narrow = Narrow(4)
    assert (narrow.config.size, narrow.config.depth) == (7, 4)
    assert narrow.config._use_default_values == ["scale"]


def test_from_config_returns_unused_kwargs_when_asked():
    config = {"size": 3, "depth": 9, "future_key": 1, "_class_name": "Widget", "_use_default_values": ["depth"]}
    widget, unused = Widget.from_config(config, return_unused_kwargs=True, scale=2.0, not_an_argument=True)
    assert (widget.config.size, widget.config.depth, widget.config.scale) == (3, 2, 2.0)  # defaulted: ours wins
    assert unused == {"future_key": 1, "not_an_argument": True, "_class_name": "Widget"}
    assert widget.config.future_key == 1 and "not_an_argument" not in widget.config
    assert isinstance(Widget.from_config(config), Widget)


def test_extract_init_dict_splits_like_the_reference():
    init, unused, hidden = Widget.extract_init_dict(
        {"size": 1, "depth": 4, "callback": 0, "other": 5, "_class_name": "Widget"}, depth=6, extra=7)
    assert init == {"size": 1, "depth": 6}
    assert unused == {"callback": 0, "other": 5, "extra": 7}
    assert hidden == {"callback": 0, "other": 5, "_class_name": "Widget"}


def test_load_config_returns_unused_kwargs_and_reads_a_file(tmp_path):
    Widget(4).save_config(tmp_path)
    config, unused = Widget.load_config(tmp_path, return_unused_kwargs=True, revision=None, mirror="x", foo=1)
    assert config["size"] == 4 and unused == {"foo": 1}
    again, commit = Widget.load_config(tmp_path / "widget.json", return_commit_hash=True)
    assert again == config and commit is None


def test_a_failing_property_keeps_its_own_error():
    class Guarded(Thing):
        @property
        def busy(self):
            raise AttributeError("no call running")

    with pytest.raises(AttributeError, match="no call running"):
        Guarded().busy
