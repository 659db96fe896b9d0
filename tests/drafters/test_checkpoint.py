"""Drafter checkpoints: round trips, the public EAGLE layout, bad and mismatched folders."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from helpers import begin_one, forward_one, tiny_llama
from prism_spec.drafters import (
    CheckpointError,
    DrafterMismatchError,
    FeatureDrafter,
    FeatureDrafterConfig,
    FeatureDrafterModel,
    StandardDrafter,
    load_drafter,
    prism_config,
    save_feature_drafter,
    save_standard_drafter,
)
from prism_spec.drafters.checkpoint import atomic_folder_write
from prism_spec.runtime import DecodeOptions, GenerationConfig, TreeConfig, generate

pytestmark = pytest.mark.usefixtures("one_thread")
PROMPT = torch.tensor([3, 14, 15, 9, 2, 6, 5, 35])
CFG = GenerationConfig(max_new_tokens=12)
OPTIONS = DecodeOptions(TreeConfig.parse("10/3/3"))


@pytest.fixture(scope="module")
def target():
    return tiny_llama(layers=3, seed=1)


def first_round_logits(drafter, target):
    out = forward_one(target, PROMPT, torch.arange(PROMPT.numel()), target.new_cache())
    return begin_one(drafter, PROMPT, int(out.logits[-1].argmax()), out.features)


CONFIGS = {
    "eagle": lambda t: FeatureDrafterConfig.for_target(t, architecture="eagle"),
    "prism": lambda t: prism_config(t),
    "prism3-star": lambda t: prism_config(t, num_modules=3, input_layers=[1, 2, 3]),
    "stacked": lambda t: FeatureDrafterConfig.for_target(t, architecture="stacked", layers_per_module=2),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_feature_drafter_round_trip(target, tmp_path, name):
    torch.manual_seed(0)
    model = FeatureDrafterModel(CONFIGS[name](target), target)
    save_feature_drafter(model, tmp_path / "d")
    config = json.loads((tmp_path / "d" / "config.json").read_text())
    assert config["architecture"] == model.config.architecture and config["vocab_size"] == target.vocab_size
    assert config["hidden_size"] == target.hidden_size and config["step_mapping"] == model.config.step_mapping
    loaded = load_drafter(tmp_path / "d", target)
    assert loaded.config == model.config
    if model.config.input_layers:  # begin() wants the layer features; compare via generate
        expected = generate(target, PROMPT, None, CFG).token_ids
        assert generate(target, PROMPT, loaded, CFG, OPTIONS).token_ids == expected
    else:
        assert torch.equal(first_round_logits(loaded, target), first_round_logits(FeatureDrafter(model), target))


def test_standard_drafter_round_trip(target, tmp_path):
    drafter = StandardDrafter.from_target_layers(target, 2)
    save_standard_drafter(drafter, target, tmp_path / "s")
    loaded = load_drafter(tmp_path / "s", target)
    assert isinstance(loaded, StandardDrafter)
    assert torch.equal(begin_one(loaded, PROMPT, 7, None), begin_one(drafter, PROMPT, 7, None))


@pytest.mark.parametrize("weights_file", ["model.safetensors", "pytorch_model.bin"])
def test_public_eagle_layout_loads(target, tmp_path, weights_file):
    """The EAGLE-1/2 / HASS release layout: an EAGLE config.json and fc.* / layers.0.* weights
    (plus an embed_tokens copy and no input norm), in safetensors or a torch pickle."""
    torch.manual_seed(0)
    ours = FeatureDrafterModel(FeatureDrafterConfig.for_target(target, architecture="eagle"), target)
    state = {k.replace("processing.0.", ""): v.clone() for k, v in ours.state_dict().items()}
    state["embed_tokens.weight"] = target.embed_tokens.weight.detach().clone()
    folder = tmp_path / "eagle-public"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": target.hidden_size,
        "vocab_size": target.vocab_size, "num_attention_heads": 4, "num_key_value_heads": 2,
        "num_hidden_layers": 1, "bias": True,
    }))
    if weights_file.endswith(".bin"):
        torch.save(state, folder / weights_file)
    else:
        save_file({k: v.contiguous() for k, v in state.items()}, str(folder / weights_file))
    loaded = load_drafter(folder, target)
    assert loaded.config.architecture == "eagle" and loaded.config.num_modules == 1
    assert torch.equal(first_round_logits(loaded, target), first_round_logits(FeatureDrafter(ours), target))
    assert generate(target, PROMPT, loaded, CFG, OPTIONS).token_ids == generate(target, PROMPT, None, CFG).token_ids


def test_mismatched_target_is_refused(target, tmp_path):
    save_feature_drafter(FeatureDrafterModel(prism_config(target), target), tmp_path / "d")
    save_standard_drafter(StandardDrafter.from_target_layers(target, 1), target, tmp_path / "s")
    other_vocab = tiny_llama(vocab_size=64, layers=2)
    other_width = tiny_llama(hidden_size=48, layers=2)
    for folder in ("d", "s"):
        with pytest.raises(DrafterMismatchError, match="vocabulary"):
            load_drafter(tmp_path / folder, other_vocab)
    with pytest.raises(DrafterMismatchError, match="hidden size"):
        load_drafter(tmp_path / "d", other_width)


def test_bad_folders_give_clear_errors(target, tmp_path):
    with pytest.raises(CheckpointError, match="not a folder"):
        load_drafter(tmp_path / "missing", target)
    with pytest.raises(CheckpointError, match="no config.json"):
        load_drafter(tmp_path, target)
    save_feature_drafter(FeatureDrafterModel(prism_config(target), target), tmp_path / "d")
    weights = (tmp_path / "d" / "model.safetensors").read_bytes()
    (tmp_path / "d" / "model.safetensors").write_bytes(weights[: len(weights) // 2])  # partial copy
    with pytest.raises(CheckpointError, match="corrupt or partial"):
        load_drafter(tmp_path / "d", target)
    (tmp_path / "d" / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="neither model.safetensors"):
        load_drafter(tmp_path / "d", target)
    (tmp_path / "d" / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_drafter(tmp_path / "d", target)
    save_feature_drafter(FeatureDrafterModel(prism_config(target), target), tmp_path / "e")
    config = json.loads((tmp_path / "e" / "config.json").read_text())
    (tmp_path / "e" / "config.json").write_text(json.dumps({**config, "architecture": "medusa"}))
    with pytest.raises(CheckpointError, match="unknown drafter architecture"):
        load_drafter(tmp_path / "e", target)
    (tmp_path / "e" / "config.json").write_text(json.dumps({**config, "num_modules": 3, "step_mapping": [0, 1, 2]}))
    with pytest.raises(CheckpointError, match="do not fit its config.json"):
        load_drafter(tmp_path / "e", target)


#: ``python -c STALLED_WRITER FOLDER MARKER WHERE`` rewrites FOLDER with atomic_folder_write and
#: stalls (MARKER created) either halfway through writing the new files (WHERE=write) or between
#: moving the previous folder aside and moving the new one in (WHERE=swap), for a SIGKILL there.
STALLED_WRITER = """
import os, sys, time
from pathlib import Path
from prism_spec.drafters import checkpoint

folder, marker, where = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]

def stall():
    marker.touch()
    time.sleep(600)

replace = os.replace
def stalling_replace(src, dst):
    replace(src, dst)
    if where == "swap" and Path(src) == folder:
        stall()
checkpoint.os.replace = stalling_replace

def write(tmp):
    (tmp / "config.json").write_text("{}")
    (tmp / "model.safetensors").write_bytes(b"half a checkpoint")
    if where == "write":
        stall()

checkpoint.atomic_folder_write(folder, write)
"""


def _kill_writer_at(where: str, folder: Path, tmp_path: Path) -> None:
    marker = tmp_path / f"stalled-{where}"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2] / "src")}
    proc = subprocess.Popen([sys.executable, "-c", STALLED_WRITER, str(folder), str(marker), where], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not marker.exists():
            assert proc.poll() is None, f"the writer exited ({proc.returncode}): {proc.stderr.read()[-2000:]}"
            assert time.monotonic() < deadline, "the writer never stalled"
            time.sleep(0.05)
        proc.kill()  # SIGKILL: no except / finally clause of the writer runs
        assert proc.wait(timeout=60) == -9
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stderr.close()


@pytest.mark.parametrize("where", ["write", "swap"])
def test_kill_9_during_a_write_keeps_the_previous_checkpoint(target, tmp_path, where):
    """SIGKILL halfway through writing the new files, or between moving the previous folder
    aside and moving the new one in: the previous drafter still loads, bit for bit, and the
    next write succeeds and leaves no temporary folder behind."""
    model = FeatureDrafterModel(prism_config(target), target)
    folder = save_feature_drafter(model, tmp_path / "d")
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    _kill_writer_at(where, folder, tmp_path)
    if where == "swap":
        assert not folder.exists()  # the window: the previous folder is aside, the new one not in
    reference = first_round_logits(load_drafter(folder, target), target)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    again = save_feature_drafter(model, folder)
    torch.testing.assert_close(first_round_logits(load_drafter(again, target), target), reference, rtol=0, atol=0)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".d.")) == []


def test_failed_write_keeps_the_previous_checkpoint(target, tmp_path):
    model = FeatureDrafterModel(prism_config(target), target)
    save_feature_drafter(model, tmp_path / "d")
    before = (tmp_path / "d" / "model.safetensors").read_bytes()

    def crash(folder):
        (folder / "model.safetensors").write_bytes(b"half")
        raise KeyboardInterrupt  # killed mid-write

    with pytest.raises(KeyboardInterrupt):
        atomic_folder_write(tmp_path / "d", crash)
    assert (tmp_path / "d" / "model.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]  # no temp folders left behind
    load_drafter(tmp_path / "d", target)
