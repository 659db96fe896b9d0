"""The training loop, its config and CLI, against a tiny random Llama saved to disk.

The tiny target has the default target's tokenizer (and chat template), hidden size 32 and two
layers; each recipe trains a few steps in a few seconds. Subprocess tests run the real
``python -m prism_spec.train`` entry point (kill-and-resume) and a real 2-process gloo job.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import tiny_chat_target
import torch
from safetensors.torch import load_file

from prism_spec.drafters import FeatureDrafter, StandardDrafter, load_drafter
from prism_spec.runtime import GenerationConfig, generate
from prism_spec.targets import load_target
from prism_spec.train import cli as train_cli
from prism_spec.train.checkpoints import CHECKPOINTS, find_latest_checkpoint, state_sha256
from prism_spec.train.config import (
    TrainConfig,
    build_config,
    read_config_file,
    recipe,
    recipe_names,
)
from prism_spec.train.data_order import DataOrder
from prism_spec.train.errors import ConfigError, TrainingError
from prism_spec.train.loop import (
    DIGEST_ENV,
    KILL_ENV,
    Trainer,
    train,
)
from prism_spec.train.overrides import parse_override

SRC = str(Path(__file__).resolve().parents[2] / "src")


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def tiny_target(tmp_path_factory) -> str:
    """A tiny random LlamaForCausalLM with the default target's tokenizer, saved to a folder."""
    return tiny_chat_target(tmp_path_factory.mktemp("tiny-target"))


@pytest.fixture(scope="module")
def data_files(tmp_path_factory) -> dict[str, str]:
    """A GSM8K-style JSONL, a ShareGPT-style JSON and a prompt-only JSONL."""
    folder = tmp_path_factory.mktemp("data")
    rng = random.Random(0)
    qa = folder / "qa.jsonl"
    with open(qa, "w") as f:
        for _ in range(24):
            a, b = rng.randint(1, 99), rng.randint(1, 99)
            f.write(json.dumps({"question": f"What is {a} plus {b}?", "answer": f"{a} + {b} = {a + b}. #### {a + b}"}) + "\n")
    chat = folder / "chat.json"
    chat.write_text(json.dumps([
        {"conversations": [{"from": "human", "value": f"Name a colour number {i}."},
                           {"from": "gpt", "value": f"Colour {i} is {'red green blue'.split()[i % 3]}."}]}
        for i in range(8)
    ]))
    prompts = folder / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Say {i}"}) + "\n" for i in range(5)))
    return {"qa": str(qa), "chat": str(chat), "prompts": str(prompts)}


def tiny_values(target: str, data: list[str], out: Path, **extra) -> dict:
    values = {
        "target": target, "data.paths": data, "output_dir": str(out), "data.max_length": 64,
        "data.holdout": 2, "log_every": 1, "checkpoint_every": 0,
    }
    values.update(extra)
    return values


def tiny_config(target, data, out, name="prism", steps=2, batch_size=2, overrides=(), **extra) -> TrainConfig:
    return build_config(recipe=name, values=tiny_values(target, data, out, **extra),
                        all_stages={"steps": steps, "epochs": None, "batch_size": batch_size},
                        overrides=list(overrides))


def _subprocess_env(**extra) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = SRC + os.pathsep + env.get("PYTHONPATH", "")
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    env.update({k: str(v) for k, v in extra.items()})
    return env


def _cli_args(target, data, out, name, steps, extra=()) -> list[str]:
    return ["--recipe", name, "--target", target, "--data", *data, "--output-dir", str(out), "--steps", str(steps),
            "--batch-size", "2", "--max-length", "64", "--set", "data.holdout=2", "--log-every", "1", *extra]


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(Path(folder) / "model.safetensors"))


def _assert_bitwise_equal(a: dict, b: dict):
    assert sorted(a) == sorted(b)
    for key in a:
        assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), f"{key} differs"


# ----------------------------------------------------------------------------- recipes
@pytest.mark.parametrize("name", ["eagle2", "hass-topk", "prism", "prism*", "stacked2", "standard"])
def test_recipe_trains_a_loadable_lossless_drafter(name, tiny_target, data_files, tmp_path, one_thread):
    extra = {"drafter.standard_layers": 1} if name == "standard" else {}
    if name == "eagle2":
        extra["save_dtype"] = "bf16"
    config = tiny_config(tiny_target, [data_files["qa"], data_files["chat"]], tmp_path / "run", name, **extra)
    trainer = Trainer(config, quiet=True)
    final = trainer.run()
    assert final == tmp_path / "run" / "drafter"

    # Outputs: a folder per stage, the final drafter, the log, the resolved config.
    enabled = [s for s in config.stages if s.enabled]
    stage_dirs = sorted((tmp_path / "run" / "stages").iterdir())
    assert [p.name.split("-", 1)[1] for p in stage_dirs] == [s.name for s in enabled]
    records = [json.loads(line) for line in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    train_records = [r for r in records if r["split"] == "train"]
    assert len(train_records) == 2 * len(enabled)
    assert {"stage", "step", "loss", "lr", "metrics", "elapsed"} <= set(train_records[0])
    evals = [r for r in records if r["split"] == "eval"]
    assert len(evals) == len(enabled) and "acc_step1" in evals[-1]["metrics"]
    resolved = json.loads((tmp_path / "run" / "train_config.json").read_text())
    assert resolved["recipe"] == name and resolved["resolved"]["world_size"] == 1

    # The frozen target the trainer used is untouched (the standard drafter starts as a copy).
    fresh = load_target(tiny_target)
    _assert_bitwise_equal(fresh.model.state_dict(), trainer.target.model.state_dict())

    drafter = load_drafter(final, fresh)
    assert isinstance(drafter, StandardDrafter if name == "standard" else FeatureDrafter)
    if name == "eagle2":
        assert all(v.dtype == torch.bfloat16 for v in _weights(final).values())
    if name == "prism*":
        assert drafter.config.input_layers == [2, 2, 1]  # default_feature_layers(2)
    if name == "stacked2":
        assert drafter.config.layers_per_module == 2
    prompt = fresh.encode_prompt("What is 12 plus 30?")
    gen = GenerationConfig(max_new_tokens=12, stop_on_eos=False)
    vanilla = generate(fresh, prompt, None, gen)
    spec = generate(fresh, prompt, drafter, gen)
    assert spec.token_ids == vanilla.token_ids


def test_prism_copies_module0_after_warmup(tiny_target, data_files, tmp_path, one_thread):
    config = tiny_config(tiny_target, [data_files["qa"]], tmp_path / "run", "prism")
    train(config, quiet=True)
    warm = _weights(tmp_path / "run" / "stages" / "0-warmup")
    for key, value in warm.items():
        if key.startswith("processing.0."):
            assert torch.equal(value, warm[key.replace("processing.0.", "processing.1.")]), key
    tuned = _weights(tmp_path / "run" / "drafter")
    assert any(not torch.equal(tuned[k], warm[k]) for k in tuned if k.startswith("processing.1."))


def test_offline_feature_cache(tiny_target, data_files, tmp_path, one_thread):
    cache = tmp_path / "cache"
    config = tiny_config(tiny_target, [data_files["qa"]], tmp_path / "run", "eagle2",
                         **{"data.feature_cache": str(cache)})
    final = train(config, quiet=True)
    assert (cache / "train" / "index.json").exists() and (cache / "holdout" / "index.json").exists()
    first = _weights(final)
    # A second run reuses the cache and is deterministic.
    final = train(config, quiet=True, overwrite=True)
    _assert_bitwise_equal(first, _weights(final))
    load_drafter(final, load_target(tiny_target))


def test_fresh_run_refuses_to_clobber_checkpoints(tiny_target, data_files, tmp_path, one_thread):
    config = tiny_config(tiny_target, [data_files["qa"]], tmp_path / "run", "eagle2", steps=1)
    train(config, quiet=True)
    assert (tmp_path / "run" / CHECKPOINTS / "latest").exists()
    with pytest.raises(TrainingError, match="--resume.*--overwrite"):
        train(config, quiet=True)
    # Resuming a finished run does no training and returns the same drafter.
    before = _weights(tmp_path / "run" / "drafter")
    train(config, quiet=True, resume=True)
    _assert_bitwise_equal(before, _weights(tmp_path / "run" / "drafter"))


def test_data_order_is_a_sharded_seeded_stream():
    one = DataOrder(10, seed=3, stage_index=0, batch_size=2, grad_accum=2, world_size=1, rank=0)
    two = [DataOrder(10, seed=3, stage_index=0, batch_size=2, grad_accum=1, world_size=2, rank=r) for r in (0, 1)]
    # Same global batch (4): one process's two micro-batches == the two ranks' batches.
    for step in range(6):  # crosses epochs (10 examples, 4 per step)
        assert one.indices(step, 0) + one.indices(step, 1) == two[0].indices(step, 0) + two[1].indices(step, 0)
    epoch0 = [i for s in range(2) for m in range(2) for i in one.indices(s, m)] + one.indices(2, 0)
    assert sorted(epoch0) == list(range(10))  # each epoch is a permutation
    again = DataOrder(10, seed=3, stage_index=0, batch_size=2, grad_accum=2, world_size=1, rank=0)
    assert again.indices(4, 1) == one.indices(4, 1)
    assert DataOrder(10, 4, 0, 2, 2, 1, 0).permutation(0) != one.permutation(0)


# ----------------------------------------------------------------------------- config
def test_recipes_have_the_paper_shapes():
    assert set(recipe_names()) >= {"eagle2", "hass", "prism", "prism*", "stacked2", "stacked3", "standard"}
    check = dict(check_files=False)
    e = build_config("eagle2", values={"data.paths": ["x"]}, **check)
    assert [s.aligned_steps for s in e.stages] == [1] and e.stages[0].objective == "eagle"
    h = build_config("hass", values={"data.paths": ["x"]}, **check)
    assert h.stages[0].aligned_steps == 3 and not h.stages[1].enabled and h.stages[1].topk_weight == 1.0
    p = build_config("prism", values={"data.paths": ["x"]}, **check)
    warm, tune = p.stages
    assert p.drafter.num_modules == 2 and p.drafter.resolved_step_mapping() == [0, 1]
    assert warm.objective == "hass" and warm.copy_module0_after and warm.lr == 3e-5
    assert tune.objective == "tuning" and tune.feature_weight == 0 and tune.ce_weight == 0.1 and tune.lr == 1e-5
    assert warm.betas == (0.9, 0.95) and warm.clip == 0.5 and warm.clip_mode == "value"
    assert build_config("prism-star", values={"data.paths": ["x"]}, **check).drafter.input_layers == "auto"
    assert build_config("stacked3", values={"data.paths": ["x"]}, **check).drafter.layers_per_module == 3
    s = build_config("standard", values={"data.paths": ["x"]}, **check)
    assert s.drafter.architecture == "standard" and s.stages[0].objective == "standard"
    assert build_config("hass-topk", values={"data.paths": ["x"]}, **check).stages[1].enabled
    with pytest.raises(ConfigError, match="data file x does not exist"):
        recipe("eagle2", **{"data.paths": ["x"]})


def test_unknown_keys_name_the_key_and_the_valid_ones():
    with pytest.raises(ConfigError) as e:
        build_config("prism", values={"data.paths": ["x"]}, overrides=["stages.0.lrr=1e-4"], check_files=False)
    assert "stages.0.lrr" in str(e.value) and "lr" in str(e.value) and "batch_size" in str(e.value)
    with pytest.raises(ConfigError, match=r"'drafter\.archi'.*architecture"):
        build_config("prism", overrides=["drafter.archi=eagle"], check_files=False)
    with pytest.raises(ConfigError, match=r"'optimizer'.*valid keys"):
        build_config(None, values={"optimizer": "sgd"}, check_files=False)
    with pytest.raises(ConfigError, match="no stage named 'nope'"):
        build_config("prism", overrides=["stages.nope.lr=1"], check_files=False)
    with pytest.raises(ConfigError, match="unknown recipe"):
        build_config("prizm", check_files=False)


def test_bad_types_and_values_are_clear():
    base = dict(values={"data.paths": ["x"]}, check_files=False)
    with pytest.raises(ConfigError, match=r"stages\.0\.lr: expected float, got 'fast'"):
        build_config("prism", overrides=["stages.0.lr=fast"], **base)
    with pytest.raises(ConfigError, match=r"stages\.0\.batch_size: expected int"):
        build_config("prism", overrides=["stages.0.batch_size=2.5"], **base)
    with pytest.raises(ConfigError, match=r"drafter\.architecture: 'medusa' is not one of"):
        build_config("prism", overrides=["drafter.architecture=medusa"], **base)
    with pytest.raises(ConfigError, match=r"mixed_precision: 'fp8' is not one of"):
        build_config("prism", overrides=["mixed_precision=fp8"], **base)
    with pytest.raises(ConfigError, match=r"stages\.1 \(tuning\): lr must be > 0"):
        build_config("prism", overrides=["stages.tuning.lr=0"], **base)
    with pytest.raises(ConfigError, match="step_mapping"):
        build_config("prism", overrides=["drafter.step_mapping=[0,2]"], **base)
    # numpy seeds 0..2**32-1: a config file's seed outside it is refused by name, not by numpy.
    for bad in (2**32, -1):
        with pytest.raises(ConfigError, match=rf"seed must be an integer in \[0, 4294967295\].* got {bad}"):
            build_config("prism", overrides=[f"seed={bad}"], **base)
    assert build_config("prism", overrides=[f"seed={2**32 - 1}"], **base).seed == 2**32 - 1
    # Good overrides, by index and by stage name, with JSON and bare values.
    c = build_config("prism", overrides=["stages.tuning.lr=2e-5", "stages.0.betas=[0.8,0.9]", "drafter.input_layers=1,2",
                                         "stages.0.clip=null", "stages.0.clip_mode=norm"], **base)
    assert c.stages[1].lr == 2e-5 and c.stages[0].betas == (0.8, 0.9) and c.drafter.input_layers == [1, 2]
    assert c.stages[0].clip is None and c.stages[0].clip_mode == "norm"
    assert parse_override("a.b=true") == ("a.b", True) and parse_override("x=hello") == ("x", "hello")


def test_missing_data_file_fails_before_any_work(tiny_target, tmp_path):
    t0 = time.perf_counter()
    with pytest.raises(ConfigError, match=r"data file .*nope\.jsonl does not exist"):
        config = build_config("prism", values=tiny_values(tiny_target, [str(tmp_path / "nope.jsonl")], tmp_path / "o"))
        train(config)
    assert time.perf_counter() - t0 < 5
    with pytest.raises(ConfigError, match="data.paths is empty"):
        build_config("prism", values={"output_dir": str(tmp_path)})


def test_empty_dataset_after_filtering_is_clear(tiny_target, data_files, tmp_path):
    config = build_config("eagle2", values=tiny_values(tiny_target, [data_files["prompts"]], tmp_path / "o"))
    with pytest.raises(TrainingError, match="empty after filtering.*prompt-only"):
        train(config, quiet=True)
    assert not (tmp_path / "o" / "drafter").exists()


def test_config_files_json_toml_yaml(tmp_path):
    (tmp_path / "c.toml").write_text(
        'recipe = "prism"\nseed = 7\n[data]\npaths = ["a.jsonl"]\nmax_length = 512\n'
        '[stages.tuning]\nlr = 2e-5\n[stages.0]\nsteps = 11\n'
    )
    c = build_config(config_file=tmp_path / "c.toml", check_files=False)
    assert c.recipe == "prism" and c.seed == 7 and c.data.max_length == 512
    assert c.stages[1].lr == 2e-5 and c.stages[0].steps == 11 and c.stages[0].lr == 3e-5
    (tmp_path / "c.json").write_text(json.dumps({"drafter": {"architecture": "eagle"}, "data": {"paths": ["a"]},
                                                 "stages": [{"name": "only", "objective": "eagle", "steps": 3}]}))
    c = build_config(config_file=tmp_path / "c.json", check_files=False)
    assert [s.name for s in c.stages] == ["only"] and c.stages[0].aligned_steps == 3
    pytest.importorskip("yaml")
    (tmp_path / "c.yaml").write_text("recipe: hass\ndata:\n  paths: [a]\nstages:\n  1:\n    enabled: true\n")
    assert build_config(config_file=tmp_path / "c.yaml", check_files=False).stages[1].enabled
    (tmp_path / "bad.toml").write_text("[data]\npathz = 1\n")
    with pytest.raises(ConfigError, match=r"'data\.pathz'"):
        build_config(config_file=tmp_path / "bad.toml", check_files=False)
    (tmp_path / "broken.json").write_text("{")
    with pytest.raises(ConfigError, match="cannot parse"):
        read_config_file(tmp_path / "broken.json")


def test_cli_errors_and_print_config(tiny_target, data_files, tmp_path, capsys):
    parser = train_cli.build_parser()
    args = parser.parse_args(["--data", str(tmp_path / "missing.jsonl"), "--output-dir", str(tmp_path / "o")])
    assert train_cli.run_train(args) == 2
    assert "missing.jsonl does not exist" in capsys.readouterr().err
    args = parser.parse_args(["--data", data_files["qa"], "--set", "stages.0.foo=1"])
    assert train_cli.run_train(args) == 2
    assert "unknown config key 'stages.0.foo'" in capsys.readouterr().err
    args = parser.parse_args(["--recipe", "prism*", "--target", tiny_target, "--data", data_files["qa"], "--steps", "5",
                              "--lr", "1e-4", "--feature-cache", str(tmp_path / "fc"), "--print-config"])
    assert train_cli.run_train(args) == 0
    printed = json.loads(capsys.readouterr().out)
    assert [s["steps"] for s in printed["stages"]] == [5, 5] and [s["lr"] for s in printed["stages"]] == [1e-4, 1e-4]
    assert printed["drafter"]["input_layers"] == "auto" and printed["data"]["feature_cache"] == str(tmp_path / "fc")
    args = parser.parse_args(["--data", data_files["qa"], "--init-from", str(tmp_path / "nowhere")])
    assert train_cli.run_train(args) == 2
    assert "is not a drafter folder" in capsys.readouterr().err
    help_text = parser.format_help()
    for option in ("--recipe", "--target", "--data", "--output-dir", "--config", "--set", "--steps", "--max-length",
                   "--resume", "--online", "--feature-cache", "--overwrite", "--init-from"):
        assert option in help_text


# ----------------------------------------------------------------------------- exact resume
#: PRISM (noise generator, stage switch, module copy) with gradient accumulation, 4 steps a
#: stage: checkpoints at global steps 3 (mid warm-up), 4 (stage end), 6 (mid tuning).
RESUME_EXTRA = ["--set", "checkpoint_every=3", "--set", "stages.0.grad_accum=2"]
RESUME_STEPS = 4


def _resume_args(target, data_files, out, *more) -> list[str]:
    data = [data_files["qa"], data_files["chat"]]
    return _cli_args(target, data, out, "prism", RESUME_STEPS, RESUME_EXTRA) + ["--quiet", *more]


@pytest.fixture(scope="module")
def uninterrupted_run(tiny_target, data_files, tmp_path_factory, one_thread) -> Path:
    """The run the interrupted ones must reproduce bit for bit (in this process, one thread,
    like the subprocesses)."""
    out = tmp_path_factory.mktemp("uninterrupted") / "ref"
    assert train_cli.run_train(train_cli.build_parser().parse_args(_resume_args(tiny_target, data_files, out))) == 0
    return out


def _steps_logged(run: Path) -> list[tuple]:
    lines = (run / "train_log.jsonl").read_text().splitlines()
    return [(r["split"], r["stage"], r["step"]) for r in map(json.loads, lines)]


def _assert_resumed_run_equals(out: Path, reference: Path) -> None:
    _assert_bitwise_equal(_weights(reference / "drafter"), _weights(out / "drafter"))
    _assert_bitwise_equal(_weights(reference / "stages" / "0-warmup"), _weights(out / "stages" / "0-warmup"))
    assert _steps_logged(out) == _steps_logged(reference)  # each step logged once, as uninterrupted
    kept = sorted(p.name for p in (out / CHECKPOINTS).glob("step-*"))
    assert len(kept) == 2  # keep_checkpoints


def test_kill_and_resume_is_bitwise_exact(tiny_target, data_files, tmp_path, uninterrupted_run):
    """A run SIGKILLed right after its checkpoint at global step 3 (mid warmup stage), resumed,
    ends with bitwise the same weights as an uninterrupted run."""
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "prism_spec.train", *_resume_args(tiny_target, data_files, out)]
    proc = subprocess.run(cmd, env=_subprocess_env(**{KILL_ENV: 3}), capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == -9, proc.stderr[-3000:]
    latest = out / CHECKPOINTS / "latest"
    assert latest.resolve().name == "step-00000003"
    state = json.loads((latest / "trainer_state.json").read_text())
    assert (state["stage_index"], state["stage_step"]) == (0, 3)
    assert not (out / "drafter").exists()

    # Resume (in this process) to the end.
    args = train_cli.build_parser().parse_args(_resume_args(tiny_target, data_files, out, "--resume"))
    assert train_cli.run_train(args) == 0
    _assert_resumed_run_equals(out, uninterrupted_run)


#: Runs ``python -m prism_spec.train ARGS`` with torch.save stalled halfway through the model
#: file of one checkpoint (half its bytes on disk, synced), so the test can SIGKILL the process
#: in the middle of that checkpoint write. $STALL_IN names the checkpoint's folder, $MARKER is
#: created once the half file is on disk.
STALLING_TRAINER = """
import io, os, sys, time
from pathlib import Path
import torch
real_save = torch.save
def save(obj, f, *args, **kwargs):
    path = Path(str(f))
    if path.name == "model.pt" and path.parent.name == os.environ["STALL_IN"]:
        buffer = io.BytesIO()
        real_save(obj, buffer, *args, **kwargs)
        with open(path, "wb") as fh:
            fh.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
            fh.flush()
            os.fsync(fh.fileno())
        Path(os.environ["MARKER"]).touch()
        time.sleep(600)
    return real_save(obj, f, *args, **kwargs)
torch.save = save
from prism_spec.train.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"the trainer exited ({proc.returncode}) before the stall:\n{proc.stderr.read()[-3000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError("the trainer never reached the stalled checkpoint write")
        time.sleep(0.05)


def test_kill_during_a_checkpoint_write_keeps_the_previous_one_and_resumes_exactly(
        tiny_target, data_files, tmp_path, uninterrupted_run):
    """kill -9 while the step-6 checkpoint is half written: the step-4 checkpoint stays the
    latest and intact, the half-written one is never taken for a checkpoint, and resuming
    ends bitwise where the uninterrupted run does."""
    out, marker = tmp_path / "killed", tmp_path / "stalled"
    cmd = [sys.executable, "-c", STALLING_TRAINER, *_resume_args(tiny_target, data_files, out)]
    env = _subprocess_env(STALL_IN=".tmp-step-00000006", MARKER=marker)
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for(marker, proc, timeout=300)
        proc.kill()  # SIGKILL, mid-write
        assert proc.wait(timeout=60) == -9
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stderr.close()

    root = out / CHECKPOINTS
    half = root / ".tmp-step-00000006" / "model.pt"
    assert 0 < half.stat().st_size < 0.6 * (root / "step-00000004" / "model.pt").stat().st_size  # about half
    with pytest.raises((RuntimeError, OSError)):  # really cut in the middle: unreadable
        torch.load(half, weights_only=True)
    assert not (root / "step-00000006").exists()
    assert (root / "latest").resolve().name == "step-00000004"
    assert find_latest_checkpoint(out) == (root / "step-00000004").resolve()
    previous = root / "step-00000004"
    state = json.loads((previous / "trainer_state.json").read_text())
    assert (state["stage_index"], state["stage_step"], state["global_step"]) == (1, 0, 4)
    assert torch.load(previous / "model.pt", weights_only=True)  # intact
    assert not (out / "drafter").exists()

    args = train_cli.build_parser().parse_args(_resume_args(tiny_target, data_files, out, "--resume"))
    assert train_cli.run_train(args) == 0
    _assert_resumed_run_equals(out, uninterrupted_run)
    assert not (root / ".tmp-step-00000006").exists()  # the half write was cleared and redone


# ----------------------------------------------------------------------------- multi-process
@pytest.mark.slow
def test_two_process_gloo_training_keeps_ranks_identical(tiny_target, data_files, tmp_path):
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "prism_spec.train",
           *_cli_args(tiny_target, [data_files["qa"], data_files["chat"]], out, "prism", 3), "--quiet"]
    proc = subprocess.run(cmd, env=_subprocess_env(**{DIGEST_ENV: 1}), capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-4000:]
    digests = [(out / f"digest-rank{r}.txt").read_text().strip() for r in (0, 1)]
    assert digests[0] == digests[1]
    resolved = json.loads((out / "train_config.json").read_text())["resolved"]
    assert resolved["world_size"] == 2 and "MULTI_CPU" in resolved["distributed_type"]
    # The saved drafter is exactly what both ranks hold.
    assert state_sha256(_weights(out / "drafter")) == digests[0]
    target = load_target(tiny_target)
    drafter = load_drafter(out / "drafter", target)
    prompt = target.encode_prompt("What is 2 plus 2?")
    gen = GenerationConfig(max_new_tokens=8, stop_on_eos=False)
    assert generate(target, prompt, drafter, gen).token_ids == generate(target, prompt, None, gen).token_ids


def test_add_train_parser_wires_into_a_top_level_cli():
    import argparse

    parser = argparse.ArgumentParser(prog="prism")
    subparsers = parser.add_subparsers(dest="command", required=True)
    sub = train_cli.add_train_parser(subparsers)
    assert sub.prog == "prism train"
    args = parser.parse_args(["train", "--recipe", "prism", "--data", "a.jsonl", "--resume", "--steps", "3"])
    assert args.func is train_cli.run_train and args.resume is True and args.steps == 3
    args = parser.parse_args(["train", "--data", "a.jsonl", "--resume", "runs/x/checkpoints/step-00000004"])
    assert args.resume == "runs/x/checkpoints/step-00000004"
    with pytest.raises(SystemExit):
        parser.parse_args(["train", "--online", "--feature-cache", "d"])  # mutually exclusive


def test_repeated_conversations_are_dropped_before_the_split(tiny_target, tmp_path):
    from transformers import AutoTokenizer

    from prism_spec.train.examples import load_examples

    data = tmp_path / "repeats.jsonl"
    rows = [{"prompt": "What is up?", "answer": "Not much."}] * 6
    rows += [{"prompt": f"Count to {i}.", "answer": " ".join(str(j) for j in range(1, i + 2))} for i in range(4)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tokenizer = AutoTokenizer.from_pretrained(tiny_target)
    config = tiny_config(tiny_target, [str(data)], tmp_path / "out")
    train, held, stats = load_examples(config, tokenizer)
    assert len(train) + len(held) == 5 and stats["skipped"]["duplicate"] == 5
    config = tiny_config(tiny_target, [str(data)], tmp_path / "out", overrides=["data.dedupe=false"])
    train, held, _ = load_examples(config, tokenizer)
    assert len(train) + len(held) == 10


def test_init_from_a_trained_drafter(tiny_target, data_files, tmp_path, one_thread):
    first = train(tiny_config(tiny_target, [data_files["qa"]], tmp_path / "a", "prism",
                              overrides=["drafter.draft_vocab_size=64"]), quiet=True)
    start = _weights(first)
    # Fine-tune on other data: tuning only (no warm-up copy), a learning rate too small to move
    # float32 weights, so the result is the starting drafter.
    config = tiny_config(tiny_target, [data_files["chat"]], tmp_path / "b", "prism", steps=1,
                         overrides=["drafter.draft_vocab_size=64", "stages.warmup.enabled=false",
                                    "stages.tuning.lr=1e-30"], init_from=str(first))
    tuned = _weights(train(config, quiet=True))
    assert tuned.keys() == start.keys()
    assert torch.equal(tuned["d2t"], start["d2t"])  # the vocabulary comes with the weights
    for key in start:
        torch.testing.assert_close(tuned[key].float(), start[key].float(), rtol=0, atol=1e-6, msg=key)
    # A drafter of another shape is refused before training, with the difference named.
    other = tiny_config(tiny_target, [data_files["qa"]], tmp_path / "c", "eagle2",
                        overrides=["drafter.draft_vocab_size=64"], init_from=str(first))
    with pytest.raises(ConfigError, match="does not match.*architecture"):
        train(other, quiet=True)
    with pytest.raises(ConfigError, match="not a drafter folder"):
        tiny_config(tiny_target, [data_files["qa"]], tmp_path / "d", "prism", init_from=str(tmp_path)).validate()


def test_a_fresh_optimizer_on_trained_weights_ramps_its_learning_rate(tiny_target, data_files, tmp_path, one_thread):
    """From scratch the first stage starts at its full rate (no warm-up steps here); a later
    stage, or a first stage started from a trained drafter, ramps up over rewarm_steps."""
    def lrs(out):
        log = [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines()]
        rows = [r for r in log if r["split"] == "train"]
        return [r["stage_name"] for r in rows], pytest.approx([r["lr"] for r in rows])

    settings = [f"stages.{stage}.{key}" for stage in ("warmup", "tuning")
                for key in ("lr=1e-3", "warmup_ratio=0", "rewarm_steps=4")]
    fresh = tiny_config(tiny_target, [data_files["qa"]], tmp_path / "a", "prism", steps=2, overrides=settings)
    first = train(fresh, quiet=True)
    # Step k of 2 steps at rate 1e-3: decay (2 - k + 1) / 2, times the ramp min(1, k / 4) where there is one.
    assert lrs(tmp_path / "a") == (["warmup", "warmup", "tuning", "tuning"], [1e-3, 5e-4, 2.5e-4, 2.5e-4])
    tuned = tiny_config(tiny_target, [data_files["qa"]], tmp_path / "b", "prism", steps=2,
                        overrides=[*settings, "stages.warmup.enabled=false"], init_from=str(first))
    train(tuned, quiet=True)
    assert lrs(tmp_path / "b") == (["tuning", "tuning"], [2.5e-4, 2.5e-4])
    off = tiny_config(tiny_target, [data_files["qa"]], tmp_path / "c", "prism", steps=2,
                      overrides=[*settings, "stages.warmup.enabled=false", "stages.tuning.rewarm_steps=0"],
                      init_from=str(first))
    train(off, quiet=True)
    assert lrs(tmp_path / "c") == (["tuning", "tuning"], [1e-3, 5e-4])


def test_data_order_grouped_by_length_covers_each_example_once_with_less_padding():
    rng = random.Random(0)
    lengths = [rng.randint(10, 500) for _ in range(1000)]
    plain = DataOrder(1000, seed=1, stage_index=0, batch_size=8, grad_accum=1, world_size=1, rank=0)
    grouped = DataOrder(1000, seed=1, stage_index=0, batch_size=8, grad_accum=1, world_size=1, rank=0,
                        lengths=lengths)
    assert sorted(grouped.permutation(0)) == list(range(1000))
    assert grouped.permutation(1) != grouped.permutation(0)

    def padding(order):
        batches = [order.indices(step, 0) for step in range(125)]
        padded = sum(max(lengths[i] for i in b) * len(b) for b in batches)
        return 1 - sum(lengths) / padded

    assert padding(grouped) < 0.1 < 0.3 < padding(plain)
    again = DataOrder(1000, seed=1, stage_index=0, batch_size=8, grad_accum=1, world_size=1, rank=0, lengths=lengths)
    assert again.permutation(0) == grouped.permutation(0)
    # Batches are not sorted by length across the epoch: long and short batches are mixed.
    firsts = [lengths[grouped.indices(step, 0)[0]] for step in range(125)]
    assert firsts != sorted(firsts) and firsts != sorted(firsts, reverse=True)
    with pytest.raises(ValueError, match="lengths"):
        DataOrder(10, 1, 0, 2, 1, 1, 0, lengths=[1, 2])


def test_console_counts_skipped_records_and_quiet_is_silent(tiny_target, data_files, tmp_path, capsys, one_thread):
    """Malformed records never stop a run, so the console says how many were skipped; with
    --quiet nothing is printed, not even transformers' "Loading weights" bar."""
    from transformers.utils import logging as hf_logging

    data = tmp_path / "some-bad.jsonl"
    data.write_text(Path(data_files["qa"]).read_text() + "{not json\n" + json.dumps({"unrelated": 1}) + "\n")
    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.enable_progress_bar()  # as in a fresh process (other tests turn the bars off)
    try:
        for quiet in (False, True):
            argv = _cli_args(tiny_target, [str(data)], tmp_path / f"out-{quiet}", "standard", 1)
            args = train_cli.build_parser().parse_args(argv + ["--quiet"] * quiet)
            assert train_cli.run_train(args) == 0
            err = capsys.readouterr().err
            if quiet:
                assert err == ""
            else:
                assert "skipped 2 malformed record(s) of 26 read (invalid_json=1, missing_field=1)" in err
    finally:
        if not was_enabled:
            hf_logging.disable_progress_bar()
