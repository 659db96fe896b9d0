"""Equal-budget training campaigns: EAGLE-2, HASS and PRISM trained on the same data for the
same number of steps, budget doubling after budget doubling, resumable across machines.

A campaign lives in a state folder (``campaign.json``, the working drafters, and under
``levels/L<n>/`` the drafters of every finished level). Level ``L`` is a budget of
``base_steps * 2**L`` optimizer steps of ``batch_size`` examples per method:

* EAGLE-2 and HASS go on from their level ``L-1`` drafters for the steps in between;
* PRISM's first stage *is* HASS on module 0 (same loss, same data order), so PRISM at budget B
  is HASS's snapshot after ``0.75 * B`` steps (taken on the way), copied into both modules,
  then ``0.25 * B`` steps of the PRISM tuning stage: the recipe's 3:1 split at equal budget,
  without training the shared part twice.

Each segment is an ordinary ``prism train`` run started from the previous drafter
(``init_from``): a fresh optimiser whose schedule warms up and decays within the segment, and a
fresh seeded data order (seed + first step), so segments walk on through the data. Every
segment of a level trains on the corpus shards finished when the level began (pinned in the
state), so a growing corpus never gives one method more data than another. Drafters are
stored in bfloat16 without anything derivable from the target (its embeddings and LM-head rows
are read from the target at load time), which keeps a level small enough to move between
machines and to commit.

``run`` cuts the running segment when ``time_budget_s`` is spent (or on SIGTERM) and saves it;
the next run, on either kind of machine, continues it at the step it reached inside its own
schedule and data order, so a GPU call or a CPU session always leaves a consistent state.
Segments that walk the same batches (``SHARE_ROLES``) compute the target's features once.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import os
import shutil
import time
from pathlib import Path
from typing import Callable

from .config import (  # noqa: F401
    METHODS,
    RECIPE_SETTINGS_FIXED,
    CampaignConfig,
    check_recipe_settings,
    level_steps,
)

STATE = "campaign.json"
STATE_LOCK = ".campaign.lock"
SHARED_FEATURES = "work-features"
PRISM_WARMUP_SHARE = 0.75


def check_segment_configs(cfg: CampaignConfig) -> None:
    """Build every method's segment config once, so that a misspelt recipe setting fails when
    the campaign starts, not hours later when that method's turn comes."""
    for method in METHODS:  # a segment's recipe is named as its method; PRISM's segments tune only
        try:
            _segment_config(cfg, method, steps=cfg.base_steps, seed=cfg.seed, init_from=None,
                            output_dir=Path("unused"), tuning_only=method == "prism", check_files=False)
        except Exception as err:  # ConfigError and the config's own validation
            raise ValueError(f"{method}'s segments cannot be configured: {err}") from None


# ----------------------------------------------------------------------------- state
def read_state(folder: str | os.PathLike) -> dict:
    path = Path(folder) / STATE
    if not path.is_file():
        raise FileNotFoundError(f"{folder} is not a campaign folder (no {STATE}); start one with `init`")
    return json.loads(path.read_text())


def write_state(folder: Path, state: dict) -> None:
    tmp = folder / f".{STATE}.tmp"
    tmp.write_text(json.dumps(state, indent=1) + "\n")
    os.replace(tmp, folder / STATE)


@contextlib.contextmanager
def state_lock(folder: str | os.PathLike):
    """Held around every read-modify-write of the state: ``campaign run`` and ``campaign eval``
    update it from two processes (an evaluation of a finished level while the next trains)."""
    with open(Path(folder) / STATE_LOCK, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def update_state(folder: str | os.PathLike, change: Callable[[dict], None]) -> dict:
    """Apply ``change`` to the state as it is on disk now and write it back, under the lock."""
    with state_lock(folder):
        state = read_state(folder)
        change(state)
        write_state(Path(folder), state)
    return state


def _save_run_state(folder: Path, state: dict) -> None:
    """Write a run's state, keeping the evaluations (``levels[*].bench``) that ``campaign eval``
    wrote since the run read it: the run owns everything else, the evaluations are eval's."""
    def replace_keeping_evaluations(on_disk: dict) -> None:
        for level, entry in on_disk["levels"].items():
            if "bench" in entry and level in state["levels"]:
                state["levels"][level]["bench"] = entry["bench"]
        on_disk.clear()
        on_disk.update(state)

    update_state(folder, replace_keeping_evaluations)


def init_campaign(folder: str | os.PathLike, config: CampaignConfig) -> dict:
    folder = Path(folder)
    if (folder / STATE).exists():
        state = read_state(folder)
        # Through from_dict, so that a setting added since the state was written reads as its default.
        if dataclasses.asdict(CampaignConfig.from_dict(state["config"])) != dataclasses.asdict(config):
            raise ValueError(f"{folder} holds a campaign with other settings; use another folder")
        return state
    if not config.data:
        raise ValueError("a campaign needs training data (corpus folders or files)")
    check_segment_configs(config)
    folder.mkdir(parents=True, exist_ok=True)
    state = {"config": dataclasses.asdict(config), "levels": {}, "drafters": {}, "steps_per_s": {},
             "segments": []}
    write_state(folder, state)
    return state


# ----------------------------------------------------------------------------- segments
def hass_to_prism(hass_dir: Path, out_dir: Path, num_modules: int = 2, step_mapping: list[int] | None = None) -> Path:
    """A PRISM drafter whose every module is the HASS module (what the PRISM recipe's warmup
    stage ends with), ready for the tuning stage."""
    from safetensors.torch import load_file, save_file

    config = json.loads((hass_dir / "config.json").read_text())
    if config.get("architecture") != "eagle" or config.get("num_modules") != 1:
        raise ValueError(f"{hass_dir} is not a one-module HASS/EAGLE drafter")
    weights = load_file(str(hass_dir / "model.safetensors"))
    out: dict = {}
    for key, tensor in weights.items():
        if key.startswith("processing.0."):
            for m in range(num_modules):
                out[f"processing.{m}." + key[len("processing.0."):]] = tensor.clone()
        else:
            out[key] = tensor
    mapping = list(step_mapping) if step_mapping else list(range(num_modules))
    config.update(architecture="prism", num_modules=num_modules, step_mapping=mapping)
    with staged_folder(out_dir) as tmp:
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        save_file(out, str(tmp / "model.safetensors"))
    return out_dir


def _segment_config(cfg: CampaignConfig, recipe: str, steps: int, seed: int, init_from: str | None,
                    output_dir: Path, tuning_only: bool = False, corpus_shards: list[int] | None = None,
                    start_step: int = 0, feature_share: str | None = None, share_role: str = "read",
                    check_files: bool = True):
    from ..config import build_config

    values = {
        "target": cfg.target, "dtype": cfg.dtype, "mixed_precision": cfg.mixed_precision, "save_dtype": "bf16",
        "data.paths": list(cfg.data), "data.max_length": cfg.max_length, "data.holdout": cfg.holdout,
        "data.seed": cfg.seed, "data.group_by_length": cfg.group_by_length, "data.corpus_shards": corpus_shards,
        "data.feature_share": feature_share, "data.feature_share_role": share_role,
        "seed": seed, "output_dir": str(output_dir), "init_from": init_from, "start_step": start_step,
        "checkpoint_every": 0, "eval_every": 0, "log_every": max(1, min(50, steps // 4)),
    }
    if cfg.draft_vocab_size:
        values["drafter.draft_vocab_size"] = cfg.draft_vocab_size
    values.update(cfg.recipe_settings.get(recipe, {}))  # a segment's recipe is named as its method
    stage_values = {"steps": steps, "batch_size": cfg.batch_size}
    config = build_config(recipe, values=values, all_stages=stage_values, check_files=check_files)
    for stage in config.stages:
        stage.lr = cfg.tuning_lr if stage.objective == "tuning" else cfg.lr
    if tuning_only:
        # PRISM from a HASS snapshot: only the tuning stage is left. It becomes stage 0, so its
        # data order is HASS's over the same steps (stage index and seed decide the order) and
        # it reads the target features HASS's segment left for those batches.
        config.stages = [stage for stage in config.stages if stage.objective == "tuning"]
        for stage in config.stages:
            stage.copy_module0_after = False
    return config


def _last_eval(run_dir: Path) -> dict:
    log = run_dir / "train_log.jsonl"
    records = [json.loads(line) for line in log.read_text().splitlines() if line.strip()] if log.exists() else []
    evals = [r for r in records if r.get("split") == "eval"]
    return evals[-1]["metrics"] | {"loss": evals[-1]["loss"]} if evals else {}


def _train(cfg: CampaignConfig, work: Path, quiet: bool, time_limit_s: float | None, **segment):
    """One segment (``segment``: :func:`_segment_config`'s keywords; from its ``start_step``
    when continuing a cut one); returns (drafter folder, held-out metrics, seconds, seconds of
    optimizer steps alone, the step of the segment it reached, what shared features saved or None)."""
    from ..loop import Trainer

    shutil.rmtree(work, ignore_errors=True)
    config = _segment_config(cfg, output_dir=work, **segment)
    config.time_limit_s = time_limit_s
    config.eval_when_cut = False  # minutes of a CPU session; a level records finished segments only
    t0 = time.perf_counter()
    trainer = Trainer(config, quiet=quiet)
    final = trainer.run()
    reached = segment["steps"] if trainer.stopped_at is None else trainer.stopped_at[1]
    return (Path(final), _last_eval(work), time.perf_counter() - t0, trainer.step_seconds, reached,
            trainer.shared_features)


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:  # another file system, or no hard links there
        shutil.copy2(src, dst)


@contextlib.contextmanager
def staged_folder(dest: Path):
    """Yields an empty folder beside ``dest`` to fill; on success it replaces ``dest`` in one move
    (a crash leaves the old or the new one, never a half-written one)."""
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(dest, ignore_errors=True)
    os.replace(tmp, dest)


def _replace_folder(src: Path, dest: Path, copy_function=shutil.copy2) -> None:
    """``dest`` becomes a copy of ``src`` in one move."""
    with staged_folder(dest) as tmp:
        shutil.copytree(src, tmp, copy_function=copy_function, dirs_exist_ok=True)


def planned_segments(state: dict) -> list[dict]:
    """The segments that take the campaign to its next level, in order (those already done in
    an interrupted level are left out)."""
    cfg = CampaignConfig.from_dict(state["config"])
    level = len(state["levels"])
    budget = level_steps(cfg, level)
    prev = level_steps(cfg, level - 1) if level else 0
    snap = int(round(PRISM_WARMUP_SHARE * budget))
    plan = [
        {"method": "eagle2", "recipe": "eagle2", "from": "eagle2", "start": prev, "stop": budget, "save": "eagle2"},
        {"method": "hass", "recipe": "hass", "from": "hass", "start": prev, "stop": snap, "save": "hass-snapshot"},
        {"method": "hass", "recipe": "hass", "from": "hass-snapshot", "start": snap, "stop": budget, "save": "hass"},
        {"method": "prism", "recipe": "prism", "from": "hass-snapshot", "start": snap, "stop": budget,
         "save": "prism", "tuning_only": True},
    ]
    done = {(s["level"], s["save"]) for s in state["segments"] if s["reached"] == s["stop"]}
    progress = state.get("progress", {})
    out = []
    for seg in plan:
        if (level, seg["save"]) in done:
            continue
        reached = progress.get(f"{level}:{seg['save']}")
        if reached is not None:
            # A time limit stopped it part way: it goes on from its own weights at the step it
            # reached, with the segment's own schedule and data order (a fresh optimizer).
            seg = dict(seg, **{"from": seg["save"]}, continue_at=reached)
        out.append(dict(seg, level=level))
    return out


def pin_level_data(state: dict, cfg: CampaignConfig, level: int) -> list[int] | None:
    """The corpus shards every segment of ``level`` trains on: those finished when the level
    began (recorded in the state, so a corpus that grows meanwhile, here or on another machine,
    does not give one method more data than another). None when the data is not a corpus."""
    from ..corpus.read import finished_shards
    from ..corpus.store import is_corpus

    pinned = state.setdefault("level_data", {})
    if str(level) in pinned:
        return pinned[str(level)]["corpus_shards"]
    corpora = [p for p in cfg.data if is_corpus(p)]
    if not corpora:
        return None
    if len(corpora) > 1 or len(cfg.data) > 1:
        raise ValueError(f"a campaign trains on one corpus folder (got {list(cfg.data)}): its levels pin its shards")
    shards = finished_shards(corpora[0])
    if not shards:
        raise ValueError(f"the corpus {corpora[0]} has no finished shard yet (prism corpus status)")
    pinned[str(level)] = {"corpus_shards": shards, "pinned": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
    return shards


#: Steps a segment must have trained for its rate to replace the one measured before.
MIN_RATE_STEPS = 8
#: Seconds a segment spends outside its training steps (loading the target, saving), and the
#: least training time worth starting a segment for.
SEGMENT_OVERHEAD_S = 25.0
MIN_SEGMENT_S = 30.0


#: The segments that share a level's batches: EAGLE-2 (0 -> B) and HASS's first part
#: (0 -> 0.75 B) walk the same data order, so HASS reads the features EAGLE-2 left; HASS's
#: second part and PRISM's tuning (0.75 B -> B) do the same.
SHARE_ROLES = {"eagle2": "write", "hass-snapshot": "read", "hass": "write", "prism": "read"}


#: Suffix of the rate of a segment that read every batch's target features (``SHARE_ROLES``):
#: on a CPU several times the rate of one that runs the target.
READ_RATE = " reading features"


def _rate_key(seg: dict, reads_features: bool) -> str:
    """Under which name a segment's measured rate is kept."""
    return seg["recipe"] + ("-tuning" if seg["method"] == "prism" else "") + (READ_RATE if reads_features else "")


def run_campaign(folder: str | os.PathLike, time_budget_s: float | None = None, max_levels: int | None = None,
                 quiet: bool = False, log: Callable[[str], None] = print,
                 data_paths: list[str] | None = None, precision: str | None = None,
                 share_features: bool = True) -> dict:
    """Train segments until the time budget is spent or ``max_levels`` levels are done. A
    segment that the budget cuts short saves its drafter and the step it reached; the next run
    goes on from there (the same schedule and data order, a fresh optimiser). ``data_paths``:
    where this machine holds the campaign's data, when not at the configured paths (a GPU
    machine that unpacked the corpus elsewhere). ``precision`` "float32" computes this run in
    float32 (CPUs without bf16 instructions run bf16 about 2.5x slower); the stored drafters
    stay bf16 either way. ``share_features``: the first segment of each pair that walks the
    same batches (``SHARE_ROLES``) leaves their target features in ``folder/work-features``
    (machine-local, never committed) for the second to read instead of running the target
    again (features.SharedFeatures); a machine that lacks them computes them, so results do
    not depend on it."""
    folder = Path(folder)
    state = read_state(folder)
    state.setdefault("progress", {})
    cfg = CampaignConfig.from_dict(state["config"])
    if data_paths:
        cfg = dataclasses.replace(cfg, data=list(data_paths))
    if precision == "float32":
        cfg = dataclasses.replace(cfg, dtype="float32", mixed_precision="no")
    elif precision not in (None, "config"):
        raise ValueError(f"precision must be 'config' or 'float32', got {precision!r}")
    t0 = time.perf_counter()
    work = folder / "work"
    while max_levels is None or len(state["levels"]) < max_levels:
        shards = pin_level_data(state, cfg, len(state["levels"]))
        _save_run_state(folder, state)
        for seg in planned_segments(state):
            left = None if time_budget_s is None else time_budget_s - (time.perf_counter() - t0)
            if _stop_requested():
                log(f"[campaign] stop requested: stopping before {seg['save']} (level {seg['level']})")
                return state
            if left is not None and left - SEGMENT_OVERHEAD_S < MIN_SEGMENT_S:
                log(f"[campaign] stopping before {seg['save']} (level {seg['level']}): {max(left, 0):.0f} s left")
                return state
            init = state["drafters"].get(seg["from"])
            init_dir = str(folder / init) if init else None
            if seg.get("tuning_only") and "continue_at" not in seg:
                spec = _segment_config(cfg, "prism", steps=1, seed=cfg.seed, init_from=None, output_dir=work,
                                       tuning_only=True, check_files=False).drafter  # M (recipe_settings)
                init_dir = str(hass_to_prism(folder / state["drafters"]["hass-snapshot"], folder / "work-prism-init",
                                             spec.num_modules, spec.resolved_step_mapping()))
            steps = seg["stop"] - seg["start"]
            first = seg.get("continue_at", seg["start"])
            log(f"[campaign] level {seg['level']}: {seg['save']} steps {first} -> {seg['stop']}"
                f" from {seg['from'] if init_dir else 'scratch'}"
                + (f" ({len(shards)} corpus shards)" if shards is not None else ""))
            # Always a limit, so a stop request (SIGTERM) can cut the segment cleanly.
            limit = 1e12 if left is None else left - SEGMENT_OVERHEAD_S
            role = SHARE_ROLES.get(seg["save"]) if share_features else None
            final, heldout, seconds, step_seconds, done, shared = _train(
                cfg, work, quiet, limit, recipe=seg["recipe"], steps=steps, seed=cfg.seed + seg["start"],
                init_from=init_dir, tuning_only=seg.get("tuning_only", False), corpus_shards=shards,
                start_step=first - seg["start"], feature_share=str(folder / SHARED_FEATURES) if role else None,
                share_role=role or "read")
            _replace_folder(final, folder / "drafters" / seg["save"])
            state["drafters"][seg["save"]] = f"drafters/{seg['save']}"
            # A segment that read some batches' features and computed others has neither rate.
            mixed = bool(shared and shared.get("read") and shared.get("computed"))
            key = None if mixed else _rate_key(seg, bool(shared and shared.get("read")))
            trained = seg["start"] + done - first
            if key and trained >= MIN_RATE_STEPS:  # a step or two cut short says little about the rate
                state["steps_per_s"][key] = round(trained / max(step_seconds, 1e-3), 4)
            reached = seg["start"] + done
            if role == "read" and reached == seg["stop"]:  # nothing else reads what is left
                shutil.rmtree(folder / SHARED_FEATURES, ignore_errors=True)
            state["segments"].append({**seg, "reached": reached, "seconds": round(seconds, 1), "heldout": heldout,
                                      "machine": machine_label(), "precision": cfg.mixed_precision,
                                      **({"shared_features": shared} if shared else {}),
                                      "finished": time.strftime("%Y-%m-%d %H:%M:%S %Z")})
            progress_key = f"{seg['level']}:{seg['save']}"
            if reached < seg["stop"]:
                state["progress"][progress_key] = reached
            else:
                state["progress"].pop(progress_key, None)
            _save_run_state(folder, state)
            shutil.rmtree(work, ignore_errors=True)
            shutil.rmtree(folder / "work-prism-init", ignore_errors=True)
            if reached < seg["stop"]:
                log(f"[campaign] time budget spent: {seg['save']} stopped at step {reached} of {seg['stop']}")
                return state
        level = len(state["levels"])
        # The snapshot only serves its own level's HASS and PRISM segments: drop it.
        shutil.rmtree(folder / SHARED_FEATURES, ignore_errors=True)
        snapshot = state["drafters"].pop("hass-snapshot", None)
        if snapshot:
            shutil.rmtree(folder / snapshot, ignore_errors=True)
        # Each method's drafter is kept apart from the working copy the next level trains on:
        # hard links where the file system allows (git stores the same bytes once either way).
        kept = {m: f"levels/L{level}/{m}" for m in METHODS}
        for m, path in kept.items():
            _replace_folder(folder / state["drafters"][m], folder / path, _link_or_copy)
        state["levels"][str(level)] = {
            "steps": level_steps(cfg, level),
            "examples": level_steps(cfg, level) * cfg.batch_size,
            "heldout": {s["save"]: s["heldout"] for s in state["segments"]
                        if s["level"] == level and s["save"] in METHODS},
            "drafters": kept,
        }
        _save_run_state(folder, state)
        log(f"[campaign] level {level} done: {level_steps(cfg, level)} steps per method")
    return state


def _stop_requested() -> bool:
    from ..loop import stop_requested

    return stop_requested()


def machine_label() -> str:
    import torch

    from ...bench.machine import machine_description

    return f"{machine_description()}, {torch.get_num_threads()} torch threads"


def status_lines(state: dict, folder: str | os.PathLike | None = None) -> list[str]:
    """What ``campaign status`` prints; with the campaign's ``folder``, the time left counts
    the shared target features this machine holds (``SHARE_ROLES``)."""
    cfg = CampaignConfig.from_dict(state["config"])
    budgets = ", ".join(str(v["steps"]) for v in state["levels"].values())
    lines = [f"levels done: {len(state['levels'])}" + (f" (budget per method: {budgets} steps)" if budgets else ""),
             f"batch {cfg.batch_size}, lr {cfg.lr:g} (PRISM tuning {cfg.tuning_lr:g}), max length {cfg.max_length}, "
             f"data {cfg.data}"]
    for method, settings in cfg.recipe_settings.items():
        lines.append(f"{method} settings: " + ", ".join(f"{k}={json.dumps(v)}" for k, v in settings.items()))
    for level, entry in state["levels"].items():
        accs = {m: entry["heldout"].get(m, {}).get("acc_step1") for m in METHODS}
        lines.append(f"  L{level} ({entry['steps']} steps): held-out step-1 top-1 "
                     + ", ".join(f"{m} {a:.3f}" if a is not None else f"{m} -" for m, a in accs.items()))
        for tree, bench in sorted(entry.get("bench", {}).items()):
            for row in bench["rows"]:
                lines.append(f"      tree {tree} {row['method']:<8} T={row['temperature']}: "
                             f"AL {row['mean_acceptance_length']:.3f}")
    if state.get("level_data", {}).get(str(len(state["levels"]))):
        shards = state["level_data"][str(len(state["levels"]))]["corpus_shards"]
        lines.append(f"level {len(state['levels'])} trains on {len(shards)} pinned corpus shards")
    pending = planned_segments(state)
    if pending:
        lines.append("next: " + ", ".join(
            f"{s['save']} {s.get('continue_at', s['start'])}->{s['stop']}" for s in pending))
    rates = ", ".join(f"{k} {v:.4f}" for k, v in state["steps_per_s"].items())
    if rates:
        last = state["segments"][-1] if state["segments"] else {}
        lines.append(f"steps/s measured: {rates}" + (f" (last on {last['machine']})" if last.get("machine") else ""))
        # A reader goes at the reading rate when its writer runs before it, or where the
        # features it reads are on this machine already.
        features_here = folder is not None and any((Path(folder) / SHARED_FEATURES).glob("*.safetensors"))
        reading, left = features_here, []
        for s in pending:
            role = SHARE_ROLES.get(s["save"])
            reading = reading or role == "write"
            key = _rate_key(s, reading and role == "read")
            reading = reading and role != "read"
            left.append((s["stop"] - s.get("continue_at", s["start"]), state["steps_per_s"].get(key)))
        if left and all(rate for _, rate in left):
            hours = sum(n / rate for n, rate in left) / 3600
            lines.append(f"this level's remaining steps: about {hours:.1f} h at those rates")
        if folder is not None and pending and SHARE_ROLES.get(pending[0]["save"]) == "read" and not features_here:
            lines.append(f"no shared target features on this machine: {pending[0]['save']} runs the target itself")
    return lines
