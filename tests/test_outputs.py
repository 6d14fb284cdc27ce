import copy
import dataclasses
import importlib
import pickle
from dataclasses import dataclass

import pytest
import torch
import torch.utils._pytree as pytree

from diffusekit.utils import BaseOutput

OUTPUT_MODULES = [
    "diffusekit.models.unet_2d", "diffusekit.models.unet_2d_condition", "diffusekit.models.unet_1d",
    "diffusekit.models.vae", "diffusekit.models.autoencoder_kl", "diffusekit.models.vq_model",
    "diffusekit.models.attention", "diffusekit.models.ldm_bert", "diffusekit.schedulers.scheduling_utils",
    "diffusekit.schedulers.karras_ve", "diffusekit.schedulers.score_sde_ve", "diffusekit.schedulers.lcm",
    "diffusekit.schedulers.flow_match_euler", "diffusekit.pipelines.pipeline_utils",
    "diffusekit.pipelines.stable_diffusion_common", "diffusekit.pipelines.flux_common",
]


@dataclass
class PairOutput(BaseOutput):
    sample: torch.Tensor
    extra: torch.Tensor | None = None


def test_mapping_and_tuple_at_once():
    sample, extra = torch.zeros(1), torch.ones(2)
    out = PairOutput(sample=sample, extra=extra)
    assert isinstance(out, dict)
    assert list(out.keys()) == ["sample", "extra"]
    assert list(out.values()) == [sample, extra] and list(out.items()) == [("sample", sample), ("extra", extra)]
    assert out["sample"] is out[0] is out.sample is sample
    assert out[1] is extra and out[:] == (sample, extra) == out.to_tuple()
    assert len(out) == 2 and list(out) == ["sample", "extra"]


def test_none_fields_are_left_out():
    out = PairOutput(torch.zeros(1))
    assert list(out.keys()) == ["sample"] and out.to_tuple() == (out.sample,)
    assert out.extra is None
    with pytest.raises(KeyError):
        out["extra"]
    with pytest.raises(IndexError):
        out[1]


def test_attribute_and_key_stay_in_sync():
    out = PairOutput(torch.zeros(1))
    out.sample = torch.ones(1)
    assert out["sample"] is out.sample
    out["sample"] = torch.full((1,), 2.0)
    assert out.sample is out["sample"] and out[0].item() == 2.0


@pytest.mark.parametrize("change", [
    lambda out: out.pop("sample"), lambda out: out.update(sample=1), lambda out: out.setdefault("x", 1),
    lambda out: out.__delitem__("sample"), lambda out: out.popitem(), lambda out: out.clear(),
])
def test_keys_cannot_be_removed_or_merged(change):
    out = PairOutput(torch.zeros(1))
    with pytest.raises(TypeError, match="PairOutput cannot remove or merge in keys"):
        change(out)
    assert list(out.keys()) == ["sample"]


def test_a_single_dict_argument_becomes_the_keys():
    sample = torch.zeros(1)
    out = PairOutput({"sample": sample})
    assert out.sample is sample and out[0] is sample and list(out.keys()) == ["sample"]


@pytest.mark.parametrize("clone", [lambda out: pickle.loads(pickle.dumps(out)), copy.deepcopy])
def test_pickle_and_deepcopy(clone):
    out = PairOutput(torch.arange(3.0), torch.ones(1))
    again = clone(out)
    assert type(again) is PairOutput and again is not out
    assert list(again.keys()) == ["sample", "extra"]
    assert torch.equal(again.sample, out.sample) and torch.equal(again[1], out.extra)
    assert vars(again).keys() == vars(out).keys()


def test_outputs_are_pytree_nodes():
    out = PairOutput(torch.zeros(1), torch.ones(1))
    assert not pytree._is_leaf(out)
    leaves, spec = pytree.tree_flatten(out)
    assert leaves == [out.sample, out.extra]
    assert spec == pytree.TreeSpec(PairOutput, ["sample", "extra"], [pytree.LeafSpec(), pytree.LeafSpec()])
    rebuilt = pytree.tree_unflatten([t * 2 for t in leaves], spec)
    assert type(rebuilt) is PairOutput and rebuilt.extra.item() == 2.0


def _package_output_classes() -> list[type]:
    for name in OUTPUT_MODULES:
        importlib.import_module(name)
    found, todo = [], list(BaseOutput.__subclasses__())
    while todo:
        cls = todo.pop()
        todo += cls.__subclasses__()
        if cls.__module__.startswith("diffusekit."):
            found.append(cls)
    return sorted(found, key=lambda c: c.__name__)


def test_every_package_output_class_is_a_mapping_dataclass():
    classes = _package_output_classes()
    assert len(classes) >= 17
    for cls in classes:
        names = [f.name for f in dataclasses.fields(cls)]
        value = torch.ones(1)
        out = cls(*([value] + [None] * (len(names) - 1)))
        assert list(out.keys()) == [names[0]], cls
        assert out[0] is value and out[names[0]] is value and getattr(out, names[0]) is value, cls
        assert pickle.loads(pickle.dumps(out))[0].item() == 1.0, cls
