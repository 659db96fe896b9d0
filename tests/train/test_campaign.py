"""Equal-budget campaigns on a tiny target: level structure, the PRISM-from-HASS split, the time
budget, resume, the size of what is stored, and the AL evaluation."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import tiny_chat_target
from safetensors import safe_open

from prism_spec.drafters import load_drafter
from prism_spec.targets import load_target
from prism_spec.train import campaign as camp
from prism_spec.train.campaign import cli
from prism_spec.train.campaign import evaluate as ev
from prism_spec.train.campaign import export
from prism_spec.train.corpus.build import build_corpus, create_corpus
from prism_spec.train.corpus.engines import HFEngine
from prism_spec.train.corpus.store import DecodingSettings


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("campaign")
    (root / "target").mkdir()
    target_dir = tiny_chat_target(root / "target", max_positions=2048)
    target = load_target(target_dir)
    prompts = root / "p.jsonl"
    prompts.write_text("".join(json.dumps({"question": f"Add {i} and {i + 3}, then say why.", "answer": "-"}) + "\n"
                               for i in range(40)))
    create_corpus(root / "corpus", target, [str(prompts)], DecodingSettings(max_new_tokens=12), shard_size=20,
                  progress=False)
    build_corpus(root / "corpus", HFEngine(target, batch_size=20), progress=False)
    return root, target_dir, target


def config(setup, **kw) -> camp.CampaignConfig:
    root, target_dir, _ = setup
    values = dict(target=target_dir, data=[str(root / "corpus")], base_steps=4, batch_size=2, max_length=64,
                  draft_vocab_size=64, holdout=4, dtype="float32", mixed_precision="no", lr=1e-3, tuning_lr=1e-3)
    values.update(kw)
    return camp.CampaignConfig(**values)


def test_two_levels_equal_budgets_and_prism_from_the_hass_snapshot(setup, tmp_path):
    _, _, target = setup
    folder = tmp_path / "c"
    camp.init_campaign(folder, config(setup))
    state = camp.run_campaign(folder, max_levels=2, quiet=True, log=lambda m: None)
    assert sorted(state["levels"]) == ["0", "1"] and [v["steps"] for v in state["levels"].values()] == [4, 8]
    segs = [(s["level"], s["save"], s["start"], s["stop"]) for s in state["segments"]]
    assert segs == [(0, "eagle2", 0, 4), (0, "hass-snapshot", 0, 3), (0, "hass", 3, 4), (0, "prism", 3, 4),
                    (1, "eagle2", 4, 8), (1, "hass-snapshot", 4, 6), (1, "hass", 6, 8), (1, "prism", 6, 8)]
    # Every method trained exactly the level's budget of steps: PRISM = 0.75 B of HASS + 0.25 B tuning.
    for level, budget in ((0, 4), (1, 8)):
        for method in ("eagle2", "hass"):
            assert sum(s["reached"] - s["start"] for s in state["segments"]
                       if s["level"] <= level and s["method"] == method) == budget
        prism = [s for s in state["segments"] if s["level"] == level and s["save"] == "prism"][0]
        snap = [s for s in state["segments"] if s["level"] <= level and s["save"] in ("hass-snapshot", "hass")
                and s["stop"] <= prism["start"]]
        assert sum(s["stop"] - s["start"] for s in snap) + prism["stop"] - prism["start"] == budget
    for method in ("eagle2", "hass", "prism"):  # each loads for the target (a mismatch raises)
        load_drafter(folder / state["drafters"][method], target)
    with safe_open(str(folder / state["drafters"]["prism"] / "model.safetensors"), "pt") as f:
        keys = list(f.keys())
        # Stored in bf16, nothing derivable from the target (no embeddings, no LM head).
        assert all(f.get_tensor(k).dtype == torch.bfloat16 for k in keys if k != "d2t")
        assert not [k for k in keys if "embed" in k or "lm_head" in k]
        # Tuning moved the modules apart from the HASS snapshot they both started as.
        a, b = f.get_tensor("processing.0.fc.weight"), f.get_tensor("processing.1.fc.weight")
        assert not torch.equal(a, b)
    assert 0 <= state["levels"]["1"]["heldout"]["prism"]["acc_step1"] <= 1
    assert "levels done: 2" in "\n".join(camp.status_lines(state))


def test_time_budget_cuts_a_segment_and_the_next_run_goes_on_from_it(setup, tmp_path, monkeypatch):
    from prism_spec.train.loop import Trainer

    folder = tmp_path / "c"
    camp.init_campaign(folder, config(setup))
    # Too little time for any segment: nothing is trained, the state is untouched.
    state = camp.run_campaign(folder, time_budget_s=1.0, quiet=True, log=lambda m: None)
    assert state["segments"] == [] and not (folder / "work").exists()
    # The time limit passes after the first optimizer step of the first segment.
    calls = {"n": 0}

    def out_of_time(self):
        calls["n"] += 1
        return calls["n"] >= 1

    monkeypatch.setattr(Trainer, "_out_of_time", out_of_time)
    monkeypatch.setattr(camp, "MIN_SEGMENT_S", 0.0)
    state = camp.run_campaign(folder, time_budget_s=1e6, quiet=True, log=lambda m: None)
    assert [(s["save"], s["start"], s["reached"]) for s in state["segments"]] == [("eagle2", 0, 1)]
    assert state["progress"] == {"0:eagle2": 1} and (folder / state["drafters"]["eagle2"]).is_dir()
    assert state["steps_per_s"] == {}  # one step, mostly loading: no rate from it
    assert state["segments"][0]["heldout"] == {}  # a cut is not validated (eval_when_cut)
    status = "\n".join(camp.status_lines(state))
    assert "next: eagle2 1->4, hass-snapshot 0->3" in status and "pinned corpus shards" in status
    monkeypatch.undo()
    monkeypatch.setattr(camp, "MIN_RATE_STEPS", 2)
    state = camp.run_campaign(folder, max_levels=1, quiet=True, log=lambda m: None)
    # Rates from the segments of at least 2 steps (EAGLE-2 1 -> 4, HASS 0 -> 3), not PRISM's one step.
    # HASS read every batch's features from EAGLE-2: its rate is kept apart from a computing one.
    assert sorted(state["steps_per_s"]) == ["eagle2", "hass reading features"]
    assert all(v > 0 for v in state["steps_per_s"].values())
    segs = [(s["save"], s["start"], s.get("continue_at"), s["reached"]) for s in state["segments"]]
    # The cut segment goes on at the step it reached, inside its own schedule (start 0 -> 4).
    assert segs == [("eagle2", 0, None, 1), ("eagle2", 0, 1, 4), ("hass-snapshot", 0, None, 3),
                    ("hass", 3, None, 4), ("prism", 3, None, 4)]
    assert state["progress"] == {} and list(state["levels"]) == ["0"]
    assert "hass-snapshot" not in state["drafters"]  # only needed within its level
    with pytest.raises(ValueError, match="other settings"):
        camp.init_campaign(folder, config(setup, batch_size=3))


def test_recipe_settings_shape_only_their_methods_segments(setup, tmp_path):
    _, _, target = setup
    folder = tmp_path / "c"
    settings = {"hass": {"stages.hass.aligned_steps": 2, "stages.hass.step_weights": [1.0, 0.5]},
                "prism": {"drafter.num_modules": 3, "drafter.step_mapping": [0, 1, 2]}}
    camp.init_campaign(folder, config(setup, recipe_settings=settings))
    state = camp.run_campaign(folder, max_levels=1, quiet=True, log=lambda m: None)

    def stage(method):
        return json.loads((folder / state["drafters"][method] / "train_config.json").read_text())["stages"][0]

    assert (stage("hass")["aligned_steps"], stage("hass")["step_weights"]) == (2, [1.0, 0.5])
    assert stage("eagle2")["step_weights"] is None and stage("prism")["objective"] == "tuning"
    assert stage("prism")["step_weights"] is None  # HASS's weights shaped only its snapshot
    heldout = state["levels"]["0"]["heldout"]
    assert "acc_step2" in heldout["hass"] and "acc_step3" not in heldout["hass"]  # two aligned steps
    prism = json.loads((folder / state["drafters"]["prism"] / "config.json").read_text())
    assert prism["num_modules"] == 3 and prism["step_mapping"] == [0, 1, 2]
    load_drafter(folder / state["drafters"]["prism"], target)
    assert "hass settings: stages.hass.aligned_steps=2" in "\n".join(camp.status_lines(state))


@pytest.mark.parametrize("settings, message", [
    ({"medusa": {"stages.0.noise_std": 0.1}}, "unknown method 'medusa'"),
    ({"hass": {"stages.hass.lr": 1e-3}}, "lr is set by the campaign"),
    ({"eagle2": {"stages.0.batch_size": 4}}, "batch_size is set by the campaign"),
    ({"hass": {"data.max_length": 64}}, "not a stage or drafter setting"),
    ({"prism": {"stages.warmup.aligned_steps": 2}}, "set it under 'hass'"),
    ({"hass": {"stages.hass.aligned_step": 2}}, "hass's segments cannot be configured.*aligned_step"),
    ({"hass": {"stages.hass.aligned_steps": 2, "stages.hass.step_weights": [1.0, 0.5, 0.25]}},
     "step_weights has 3 entries"),
])
def test_recipe_settings_a_campaign_cannot_honour_fail_before_anything_is_written(setup, tmp_path, settings,
                                                                                   message):
    with pytest.raises(ValueError, match=message):
        camp.init_campaign(tmp_path / "c", config(setup, recipe_settings=settings))
    assert not (tmp_path / "c").exists()


def test_a_state_written_before_a_setting_existed_still_matches_its_config(setup, tmp_path):
    folder = tmp_path / "c"
    camp.init_campaign(folder, config(setup))
    state = json.loads((folder / "campaign.json").read_text())
    del state["config"]["recipe_settings"]  # as campaign.json files written before the field
    (folder / "campaign.json").write_text(json.dumps(state))
    camp.init_campaign(folder, config(setup))  # the same campaign: no "other settings" error
    with pytest.raises(ValueError, match="other settings"):
        camp.init_campaign(folder, config(setup, recipe_settings={"hass": {"stages.hass.aligned_steps": 2}}))


def test_trainer_time_limit_saves_the_drafter_where_it_stopped(setup, tmp_path, monkeypatch):
    from prism_spec.train.loop import Trainer

    cfg = camp._segment_config(config(setup), "prism", 6, 0, None, tmp_path / "run")
    cfg.time_limit_s = 1e-9  # passed after the first step
    trainer = Trainer(cfg, quiet=True)
    final = trainer.run()
    assert trainer.stopped_at == (0, 1)
    assert (final / "model.safetensors").is_file() and not (tmp_path / "run" / "stages" / "1-tuning").exists()
    log = [json.loads(line) for line in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    assert max(r["step"] for r in log if r["split"] == "train") == 1 and any(r["split"] == "eval" for r in log)


def test_status_counts_time_left_with_the_features_this_machine_holds(setup, tmp_path):
    folder = tmp_path / "c"
    camp.init_campaign(folder, config(setup))
    state = camp.run_campaign(folder, max_levels=1, quiet=True, log=lambda m: None)
    state["steps_per_s"] = {"eagle2": 1e-3, "hass": 1e-3, "hass reading features": 4e-3,
                            "prism-tuning": 1e-3, "prism-tuning reading features": 4e-3}
    # Level 1 (8 steps): EAGLE-2 4 -> 8 writes what HASS 4 -> 6 reads; HASS 6 -> 8 what PRISM reads.
    status = "\n".join(camp.status_lines(state, folder))
    assert f"about {(4000 + 500 + 2000 + 500) / 3600:.1f} h" in status and "runs the target itself" not in status
    # EAGLE-2 done on another machine: HASS 4 -> 6 finds no features here and runs the target.
    state["segments"].append({"level": 1, "save": "eagle2", "reached": 8, "stop": 8})
    status = "\n".join(camp.status_lines(state, folder))
    assert f"about {(2000 + 2000 + 500) / 3600:.1f} h" in status
    assert "no shared target features on this machine: hass-snapshot runs the target itself" in status
    (folder / camp.SHARED_FEATURES).mkdir(exist_ok=True)
    (folder / camp.SHARED_FEATURES / "batch.safetensors").write_bytes(b"")
    status = "\n".join(camp.status_lines(state, folder))
    assert f"about {(500 + 2000 + 500) / 3600:.1f} h" in status and "runs the target itself" not in status


def test_a_cut_is_validated_only_when_asked(setup, tmp_path):
    from prism_spec.train.loop import Trainer

    for eval_when_cut in (True, False):
        cfg = camp._segment_config(config(setup), "eagle2", 6, 0, None, tmp_path / f"run-{eval_when_cut}")
        cfg.time_limit_s, cfg.eval_when_cut = 1e-9, eval_when_cut
        trainer = Trainer(cfg, quiet=True)
        trainer.run()
        assert trainer.stopped_at == (0, 1)
        log = (tmp_path / f"run-{eval_when_cut}" / "train_log.jsonl").read_text().splitlines()
        assert any(json.loads(line)["split"] == "eval" for line in log) == eval_when_cut


def test_hass_to_prism_copies_module_0(setup, tmp_path):
    folder = tmp_path / "c"
    camp.init_campaign(folder, config(setup))
    state = camp.run_campaign(folder, max_levels=1, quiet=True, log=lambda m: None)
    out = camp.hass_to_prism(folder / state["drafters"]["hass"], tmp_path / "p")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architecture"] == "prism" and cfg["num_modules"] == 2 and cfg["step_mapping"] == [0, 1]
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert torch.equal(f.get_tensor("processing.0.fc.weight"), f.get_tensor("processing.1.fc.weight"))
    with pytest.raises(ValueError, match="one-module"):
        camp.hass_to_prism(out, tmp_path / "q")


def test_every_level_keeps_its_drafters_and_any_level_can_be_evaluated_and_plotted(setup, tmp_path):
    folder = tmp_path / "c"
    camp.init_campaign(folder, config(setup))
    camp.run_campaign(folder, max_levels=2, quiet=True, log=lambda m: None)
    state = camp.read_state(folder)
    for level in ("0", "1"):
        kept = state["levels"][level]["drafters"]
        assert kept == {m: f"levels/L{level}/{m}" for m in ("eagle2", "hass", "prism")}
    # Level 1's archive is the working copy; level 0's is what level 1 trained on from.
    for m in ("eagle2", "hass", "prism"):
        now = (folder / state["drafters"][m] / "model.safetensors").read_bytes()
        assert (folder / "levels/L1" / m / "model.safetensors").read_bytes() == now
        assert (folder / "levels/L0" / m / "model.safetensors").read_bytes() != now
    assert state["levels"]["1"]["examples"] == 8 * 2
    for level in (0, 1):  # level 0 after level 1 has trained: from its archive
        bench = ev.evaluate_level(folder, questions=1, max_new_tokens=8, tree="8/3/3", device="cpu", level=level)
        rows = {r["method"]: r for r in bench["rows"]}
        assert set(rows) == {"vanilla", "eagle2", "hass", "prism"}
        assert rows["vanilla"]["mean_acceptance_length"] == 1.0
        for method in ("eagle2", "hass", "prism"):
            assert rows[method]["t0_outputs_differing_from_vanilla"] == 0 and rows[method]["runs"] == 6
        assert camp.read_state(folder)["levels"][str(level)]["bench"]["8/3/3 1q"]["rows"] == bench["rows"]
    # A second tree for the last level: its own entry and folder, the first one kept.
    ev.evaluate_level(folder, questions=1, max_new_tokens=8, tree="4/0/3", device="cpu")
    state = camp.read_state(folder)
    assert sorted(state["levels"]["1"]["bench"]) == ["4/0/3 1q", "8/3/3 1q"]
    assert sorted(state["levels"]["0"]["bench"]) == ["8/3/3 1q"]
    assert (folder / "bench-L1-4-0-3-1q" / "summary.json").is_file() and (folder / "bench-L1-8-3-3-1q").is_dir()
    curves = ev.plot_learning_curves(state, tmp_path / "curves.png")
    assert [(r["level"], r["examples"], r["evaluation"], r["method"]) for r in curves] == [
        (0, 8, "8/3/3 1q", m) for m in ("eagle2", "hass", "prism")] + [
        (1, 16, tree, m) for tree in ("4/0/3 1q", "8/3/3 1q") for m in ("eagle2", "hass", "prism")]
    assert "tree 4/0/3 1q prism" in "\n".join(camp.status_lines(state))
    held = ev.heldout_curves(state)  # every finished level, evaluated or not: EAGLE-2 step 1, the others 1-3
    assert [(r["level"], r["method"], r["step"]) for r in held] == [
        (level, m, step) for level in (0, 1) for m, steps in (("eagle2", [1]), ("hass", [1, 2, 3]), ("prism", [1, 2, 3]))
        for step in steps]
    assert held[0]["accuracy"] == state["levels"]["0"]["heldout"]["eagle2"]["acc_step1"]
    # T=0 acceptance replayed from the greedy continuations equals the decoded one (float64).
    decoded = ev.evaluate_level(folder, questions=1, max_new_tokens=8, tree="4/0/3", device="cpu", dtype="float64")
    replayed = ev.replay_level(folder, questions=1, max_new_tokens=8, tree="4/0/3", device="cpu", dtype="float64")
    want = {r["method"]: r["mean_acceptance_length"] for r in decoded["rows"] if r["method"] != "vanilla"}
    assert {r["method"]: r["mean_acceptance_length"] for r in replayed["rows"]} == pytest.approx(want, abs=1e-12)
    assert (folder / "replay-continuations-float64.jsonl").is_file()
    assert {"4/0/3 float64 1q", "4/0/3 float64 replay 1q"} <= set(camp.read_state(folder)["levels"]["1"]["bench"])
    # Another question count is an entry of its own; an entry under a key without its count
    # (as stored before keys had one) is renamed, not duplicated, when the next one is stored.
    bench = camp.read_state(folder)["levels"]["1"]["bench"]
    old = bench.pop("4/0/3 float64 replay 1q")
    camp.update_state(folder, lambda s: s["levels"]["1"]["bench"].update({"4/0/3 float64 replay": old}))
    ev.replay_level(folder, questions=2, max_new_tokens=8, tree="4/0/3", device="cpu", dtype="float64")
    keys = set(camp.read_state(folder)["levels"]["1"]["bench"])
    assert {"4/0/3 float64 replay 1q", "4/0/3 float64 replay 2q"} <= keys and "4/0/3 float64 replay" not in keys
    assert (tmp_path / "curves.png").stat().st_size > 1000
    # A sampled-only point: no vanilla runs, and an entry (and folder) of its own beside T=0's.
    sampled = ev.evaluate_level(folder, questions=1, max_new_tokens=8, tree="4/0/3", device="cpu",
                                temperatures=(1.0,), vanilla=False)
    assert sorted(r["method"] for r in sampled["rows"]) == ["eagle2", "hass", "prism"]
    assert all(r["temperature"] == 1.0 and r["mean_speedup"] is None for r in sampled["rows"])
    assert {"4/0/3 1q", "4/0/3 T=1 1q"} <= set(camp.read_state(folder)["levels"]["1"]["bench"])
    assert (folder / "bench-L1-4-0-3-T1-1q" / "summary.json").is_file()
    assert ev.bench_key("paper", "float32", 20, temperatures=(1.0, 0.0)) == "paper T=0,1 20q"
    # From the command line, one replay per temperature, each its own entry and continuations.
    replay = ["eval", str(folder), "--replay", "--questions", "1", "--max-new-tokens", "8", "--tree", "4/0/3",
              "--device", "cpu"]
    assert cli.main(replay + ["--temperature", "0", "--temperature", "1"]) == 0
    hot = camp.read_state(folder)["levels"]["1"]["bench"]["4/0/3 replay T=1 1q"]
    assert {r["temperature"] for r in hot["rows"]} == {1.0} and "4/0/3 replay 1q" in camp.read_state(folder)["levels"]["1"]["bench"]
    assert (folder / "replay-continuations-float32-T1.jsonl").is_file()
    assert cli.main(replay + ["--temperature", "1", "--no-vanilla"]) == 2  # a replay decodes nothing
    with pytest.raises(ValueError, match="replay"):
        ev.evaluate_level(folder, questions=1, temperatures=(0.0, 1.0), vanilla=False)
    with pytest.raises(ValueError, match="not finished"):
        ev.evaluate_level(folder, questions=1, level=2)
    # Shipping level 0's PRISM: the drafter loads, and its README says where it came from.
    out = export.export_drafter(folder, tmp_path / "shipped", "prism", level=0, command="ship it")
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    load_drafter(out, setup[2])
    readme = (out / "README.md").read_text()
    assert "campaign level 0" in readme and "4 optimizer steps of 2 examples" in readme and "`ship it`" in readme
    assert "| 8/3/3 1q | 8/3/3 | 1 | 8 | float32 | 0 |" in readme
    # Level 1's PRISM carries HASS up to level 1's snapshot and level 1's tuning, not level 0's.
    assert [(s["level"], s["save"]) for s in export.trained_by(state, "prism", 1)] == [
        (0, "hass-snapshot"), (0, "hass"), (1, "hass-snapshot"), (1, "prism")]
    assert [(s["level"], s["save"]) for s in export.trained_by(state, "hass", 0)] == [(0, "hass-snapshot"), (0, "hass")]
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "a.txt").write_text("keep")
    with pytest.raises(ValueError, match="not a drafter folder"):
        export.export_drafter(folder, tmp_path / "notes")
    assert (tmp_path / "notes" / "a.txt").read_text() == "keep"


def test_a_state_without_archives_evaluates_only_its_last_level_before_the_next_trains(setup, tmp_path):
    folder = tmp_path / "c"
    camp.init_campaign(folder, config(setup))
    state = camp.run_campaign(folder, max_levels=1, quiet=True, log=lambda m: None)
    del state["levels"]["0"]["drafters"]  # as written before levels kept their drafters
    assert ev.level_drafters(state, "0") == {m: state["drafters"][m] for m in ("eagle2", "hass", "prism")}
    state["segments"].append({"level": 1, "save": "eagle2", "start": 4, "stop": 8, "reached": 5})
    with pytest.raises(ValueError, match="not kept"):
        ev.level_drafters(state, "0")
    with pytest.raises(ValueError, match="no evaluated level"):
        ev.plot_learning_curves(state, tmp_path / "x.png")


def test_a_continued_stage_keeps_its_schedule_and_data_order(setup, tmp_path, monkeypatch):
    """Cut after 3 of 10 steps and continued from the saved drafter: the learning rate is the
    uncut run's from the re-warm's end on, and the batches are the uncut run's."""
    from prism_spec.train.examples import BatchSource
    from prism_spec.train.loop import Trainer

    cfg = config(setup)
    batches = []
    real_batch = BatchSource.batch

    def batch(self, indices):
        if len(self.examples) > cfg.holdout:  # the training split's batches, not evaluation's
            batches.append(tuple(indices))
        return real_batch(self, indices)

    def run(out, **kw):
        c = camp._segment_config(cfg, "hass", 10, 0, kw.pop("init_from", None), out, start_step=kw.pop("start_step", 0))
        c.log_every = 1
        for stage in c.stages:
            stage.rewarm_steps = 2
        for k, v in kw.items():
            setattr(c, k, v)
        trainer = Trainer(c, quiet=True)
        final = trainer.run()
        log = [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines()]
        return trainer, final, {r["step"]: r for r in log if r["split"] == "train"}

    monkeypatch.setattr(BatchSource, "batch", batch)
    _, _, whole = run(tmp_path / "whole")
    whole_batches, batches[:] = list(batches), []
    calls = {"n": 0}

    def out_of_time(self):
        calls["n"] += 1
        return calls["n"] >= 3

    monkeypatch.setattr(Trainer, "_out_of_time", out_of_time)
    cut, cut_final, first = run(tmp_path / "cut", time_limit_s=1e6)
    assert cut.stopped_at == (0, 3) and sorted(first) == [1, 2, 3]
    monkeypatch.setattr(Trainer, "_out_of_time", lambda self: False)
    _, _, rest = run(tmp_path / "rest", init_from=str(cut_final), start_step=3)
    assert batches == whole_batches
    assert sorted(rest) == list(range(4, 11))
    assert rest[4]["lr"] == pytest.approx(whole[4]["lr"] / 2)  # re-warming
    for step in range(5, 11):
        assert rest[step]["lr"] == pytest.approx(whole[step]["lr"])
        assert rest[step]["epoch"] == whole[step]["epoch"]
    for step in range(1, 4):
        assert first[step]["loss"] == whole[step]["loss"]
    with pytest.raises(Exception, match="init_from"):
        camp._segment_config(cfg, "hass", 10, 0, None, tmp_path / "x", start_step=3)


def test_a_level_trains_on_the_corpus_shards_finished_when_it_began(setup, tmp_path, monkeypatch):
    root, _, target = setup
    corpus = tmp_path / "corpus"
    prompts = root / "p.jsonl"
    create_corpus(corpus, target, [str(prompts)], DecodingSettings(max_new_tokens=12), shard_size=20, progress=False)
    build_corpus(corpus, HFEngine(target, batch_size=20), shards=[1], progress=False)
    folder = tmp_path / "c"
    camp.init_campaign(folder, config(setup, data=[str(corpus)]))
    seen = []
    real_train = camp._train

    def train(*args, **kw):
        seen.append(kw["corpus_shards"])
        if len(seen) == 2:  # shard 0 finishes while level 0 is under way
            build_corpus(corpus, HFEngine(target, batch_size=20), shards=[0], progress=False)
        return real_train(*args, **kw)

    monkeypatch.setattr(camp, "_train", train)
    state = camp.run_campaign(folder, max_levels=2, quiet=True, log=lambda m: None)
    assert seen == [[1]] * 4 + [[0, 1]] * 4
    assert {k: v["corpus_shards"] for k, v in state["level_data"].items()} == {"0": [1], "1": [0, 1]}
    with pytest.raises(ValueError, match="one corpus"):
        camp.pin_level_data({}, config(setup, data=[str(corpus), str(root / "corpus")]), 0)


def test_hass_reads_the_features_eagle2_left_and_trains_the_same_drafter(setup, tmp_path):
    from safetensors.torch import load_file

    runs = {}
    for share in (True, False):
        folder = tmp_path / f"share-{share}"
        camp.init_campaign(folder, config(setup))
        runs[share] = camp.run_campaign(folder, max_levels=1, quiet=True, log=lambda m: None, share_features=share)
        assert not (folder / camp.SHARED_FEATURES).exists()  # cleared once HASS has read it
    segs = {s["save"]: s for s in runs[True]["segments"]}
    assert segs["eagle2"]["shared_features"] == {"role": "write", "read": 0, "computed": 0, "written": 4}
    # HASS's first 3 steps are EAGLE-2's first 3 batches: no target pass for them.
    assert segs["hass-snapshot"]["shared_features"] == {"role": "read", "read": 3, "computed": 0, "written": 0}
    # PRISM's tuning walks the batches of HASS's last steps (3 -> 4) and reads what HASS left.
    assert segs["hass"]["shared_features"] == {"role": "write", "read": 0, "computed": 0, "written": 1}
    assert segs["prism"]["shared_features"] == {"role": "read", "read": 1, "computed": 0, "written": 0}
    assert all("shared_features" not in s for s in runs[False]["segments"])
    for method in ("eagle2", "hass", "prism"):
        a = load_file(str(tmp_path / "share-True" / runs[True]["drafters"][method] / "model.safetensors"))
        b = load_file(str(tmp_path / "share-False" / runs[False]["drafters"][method] / "model.safetensors"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_stop_request_saves_the_running_segment_and_ends_the_run(setup, tmp_path, monkeypatch):
    """What SIGTERM does to `campaign run`: the segment stops after its current step, saved."""
    from prism_spec.train import loop

    real_log = loop.Trainer._log

    def log(self, record):
        real_log(self, record)
        if record["split"] == "train" and record["step"] == 2:
            loop.request_stop()

    monkeypatch.setattr(loop.Trainer, "_log", log)
    monkeypatch.setitem(loop._STOP, "requested", False)
    folder = tmp_path / "c"
    camp.init_campaign(folder, config(setup))
    state = camp.run_campaign(folder, quiet=True, log=lambda m: None)
    assert [(s["save"], s["reached"]) for s in state["segments"]] == [("eagle2", 2)]
    assert state["progress"] == {"0:eagle2": 2} and (folder / state["drafters"]["eagle2"]).is_dir()
    assert camp.read_state(folder) == state


def test_an_evaluation_written_while_the_next_level_trains_is_kept(setup, tmp_path, monkeypatch):
    """`campaign eval` of level 0 while `campaign run` trains level 1 (two processes): the run's
    later writes of its own state keep the evaluation instead of the state it read at its start."""
    folder = tmp_path / "c"
    camp.init_campaign(folder, config(setup))
    camp.run_campaign(folder, max_levels=1, quiet=True, log=lambda m: None)
    real_train, evaluated = camp._train, []

    def train(*args, **kw):
        if not evaluated:  # the first segment of level 1 is under way
            evaluated.append(ev.replay_level(folder, questions=1, max_new_tokens=8, tree="4/0/3", device="cpu",
                                             level=0))
        return real_train(*args, **kw)

    monkeypatch.setattr(camp, "_train", train)
    state = camp.run_campaign(folder, max_levels=2, quiet=True, log=lambda m: None)
    assert sorted(state["levels"]) == ["0", "1"]
    on_disk = camp.read_state(folder)
    assert on_disk["levels"]["0"]["bench"] == {"4/0/3 replay 1q": evaluated[0]}
    assert "bench" not in on_disk["levels"]["1"]
