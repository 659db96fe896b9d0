"""The drafter registry is what load, train and bench read: a new drafter kind is one class and
one registration, and is then loadable, trainable by recipe name and benchable by kind name."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import tiny_chat_target

from prism_spec.bench.cli import main as bench_main
from prism_spec.bench.methods import MethodError, MethodSpec
from prism_spec.cli import main as cli_main
from prism_spec.drafters import (REGISTRY, BenchKind, CheckpointError, DrafterKind, FeatureDrafter, Recipe,
                                 load_drafter, load_feature_model, register)
from prism_spec.runtime import DecodeOptions, GenerationConfig, TreeConfig, generate
from prism_spec.targets import load_target
from prism_spec.train.config import recipe_dict
from prism_spec.train.errors import ConfigError


class EchoDrafter(FeatureDrafter):
    """A new kind for the test: a feature drafter of its own class and architecture name."""


def _echo_recipe() -> dict:
    return {"drafter": {"architecture": "echo"},
            "stages": [dict(name="echo", objective="eagle", aligned_steps=1, feature_weight=1.0, ce_weight=0.1,
                            noise_std=0.0, lr=1e-3)]}


@pytest.fixture
def echo_kind():
    kind = register(DrafterKind(
        "echo", lambda folder, config, target: EchoDrafter(load_feature_model(folder, config, target)),
        recipes=(Recipe("echo", "the echo drafter", _echo_recipe),),
        bench_kinds=(BenchKind("echo", "echo drafter folder"),),
    ))
    yield kind
    REGISTRY.pop("echo")


@pytest.fixture(scope="module")
def tiny_target(tmp_path_factory) -> str:
    return tiny_chat_target(tmp_path_factory.mktemp("tiny-target"), max_positions=2048)


@pytest.fixture(scope="module")
def data_file(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("data") / "qa.jsonl"
    path.write_text("".join(json.dumps({"question": f"What is {i} plus {i}?", "answer": f"{2 * i}."}) + "\n"
                            for i in range(12)))
    return str(path)


@pytest.mark.usefixtures("one_thread")
def test_a_registered_kind_is_trainable_loadable_and_benchable(echo_kind, tiny_target, data_file, tmp_path):
    out = tmp_path / "run"
    assert cli_main(["train", "--recipe", "echo", "--target", tiny_target, "--data", data_file, "--output-dir", str(out),
                     "--steps", "2", "--batch-size", "2", "--max-length", "64", "--set", "data.holdout=2",
                     "--quiet"]) == 0
    assert json.loads((out / "drafter" / "config.json").read_text())["architecture"] == "echo"

    target = load_target(tiny_target, dtype="float64")
    drafter = load_drafter(out / "drafter", target)
    assert isinstance(drafter, EchoDrafter) and drafter.supports_batches
    prompt = target.encode_prompt("What is 3 plus 4?")
    config = GenerationConfig(max_new_tokens=8)
    spec = generate(target, prompt, drafter, config, DecodeOptions(TreeConfig.parse("6/3/2")))
    assert spec.token_ids == generate(target, prompt, None, config).token_ids

    bench = tmp_path / "bench"
    assert bench_main(["--target", tiny_target, "--dtype", "float64", "--limit", "1", "--bench", "qa",
                       "--method", "vanilla", "--method", f"echo={out / 'drafter'}", "--max-new-tokens", "6",
                       "--tree", "6/3/2", "--out", str(bench), "--no-progress", "--no-warmup"]) == 0
    rows = {r["method"]: r for r in json.loads((bench / "summary.json").read_text())["rows"]}
    assert rows["echo"]["t0_outputs_differing_from_vanilla"] == 0


def test_unregistered_names_fail_clearly(tmp_path):
    with pytest.raises(ConfigError, match="unknown recipe 'echo'"):
        recipe_dict("echo")
    with pytest.raises(MethodError, match="unknown method 'echo'"):
        MethodSpec.parse("echo=somewhere")
    folder = tmp_path / "d"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"architecture": "echo"}))
    with pytest.raises(CheckpointError, match="unknown drafter architecture 'echo'"):
        load_drafter(folder, object())


def test_names_cannot_be_taken_twice(echo_kind):
    with pytest.raises(ValueError, match="recipe 'echo' already belongs to architecture 'echo'"):
        register(DrafterKind("echo2", echo_kind.load, recipes=(Recipe("echo", "again", _echo_recipe),)))
    with pytest.raises(ValueError, match="trains_as"):
        DrafterKind("x", echo_kind.load, trains_as="magic")


def test_batch_capability_follows_what_a_drafter_implements():
    from prism_spec.drafters import SingleSequenceDrafter, StandardDrafter

    class OneAtATime(SingleSequenceDrafter):
        def begin_one(self, prompt_ids, first_token, features):
            return torch.zeros(4)

        def extend_one(self, tokens, features):
            return torch.zeros(4)

        def expand_one(self, tokens, parent_slots, tree_mask, depth):
            return torch.zeros(len(tokens), 4)

        def end_round(self):
            pass

    assert not OneAtATime.supports_batches
    assert FeatureDrafter.supports_batches and StandardDrafter.supports_batches
