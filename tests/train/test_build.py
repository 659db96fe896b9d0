"""The drafter a training run starts from (train/build.py)."""

from __future__ import annotations

import pytest
import torch
from helpers import tiny_llama

from prism_spec.train.build import build_drafter
from prism_spec.train.config import build_config
from prism_spec.train.errors import ConfigError

DATA = {"data.paths": ["x"]}


@pytest.fixture(scope="module")
def target(one_thread):
    return tiny_llama(layers=3, dtype=torch.float32)


def drafter_for(target, recipe="eagle2", **values):
    config = build_config(recipe, values={**DATA, **values}, check_files=False)
    return build_drafter(config, target, None)


def test_init_from_target_layer_copies_the_layer_into_every_module(target):
    drafter = drafter_for(target, "prism", **{"drafter.init_from_target_layer": -1})
    source = target.family.layers[2].state_dict()
    for module in drafter.processing:
        own = module.layers[0].state_dict()
        assert "input_layernorm.weight" not in own  # the fc output goes straight into attention
        assert own and all(torch.equal(v, source[k].float()) for k, v in own.items())
        assert all(p.requires_grad for p in module.parameters())
    random = drafter_for(target, "prism")
    assert not torch.equal(random.processing[0].layers[0].mlp.up_proj.weight, source["mlp.up_proj.weight"])
    # the fc is not copied from anywhere: the same seed gives the same random fc either way
    torch.manual_seed(0)
    a = drafter_for(target, **{"drafter.init_from_target_layer": 0}).processing[0].fc.weight
    torch.manual_seed(0)
    b = drafter_for(target).processing[0].fc.weight
    assert torch.equal(a, b)


def test_init_from_target_layer_rejects_a_layer_the_target_lacks(target):
    with pytest.raises(ConfigError, match="has 3 layers"):
        drafter_for(target, **{"drafter.init_from_target_layer": 3})
    with pytest.raises(ConfigError, match="feature drafters"):
        build_config("standard", values={**DATA, "drafter.init_from_target_layer": 0}, check_files=False)
