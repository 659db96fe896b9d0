"""Ship a campaign's drafter: one finished level's drafter of one method, copied into a folder of
its own (e.g. the package's drafter for the default target) with a README that says where it
came from: the campaign's settings, the level's budget and data, the machines and time that
trained it, its held-out accuracy and every evaluation of its level."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from . import METHODS, CampaignConfig, read_state, staged_folder
from .evaluate import level_drafters, level_examples

#: What a shipped drafter folder holds: the drafter itself (train logs stay in the campaign).
DRAFTER_FILES = ("config.json", "model.safetensors")


def export_drafter(folder: str | os.PathLike, out: str | os.PathLike, method: str = "prism",
                   level: int | None = None, command: str | None = None) -> Path:
    """Copy ``method``'s drafter of finished ``level`` (default: the last) from campaign
    ``folder`` into ``out`` with a provenance README, replacing ``out`` in one move. ``out``
    must be a drafter folder already or not exist (nothing else is overwritten)."""
    folder, out = Path(folder), Path(out)
    state = read_state(folder)
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; a campaign trains {list(METHODS)}")
    if not state["levels"]:
        raise ValueError(f"{folder} has no finished level yet")
    level_key = str(len(state["levels"]) - 1 if level is None else level)
    source = folder / level_drafters(state, level_key)[method]
    if out.exists() and not (out / "config.json").is_file():
        raise ValueError(f"{out} exists and is not a drafter folder: refusing to replace it")
    with staged_folder(out) as tmp:
        for name in DRAFTER_FILES:
            shutil.copy2(source / name, tmp / name)
        (tmp / "README.md").write_text(provenance(state, level_key, method, folder, command))
    return out


def provenance(state: dict, level: str, method: str, folder: Path, command: str | None = None) -> str:
    """The README of an exported drafter, from the campaign state alone."""
    cfg = CampaignConfig.from_dict(state["config"])
    entry = state["levels"][level]
    drafter = json.loads((folder / level_drafters(state, level)[method] / "config.json").read_text())
    segments = trained_by(state, method, int(level))
    hours = sum(s["seconds"] for s in segments) / 3600
    machines = sorted({s["machine"] for s in segments if s.get("machine")})
    shards = state.get("level_data", {}).get(level, {}).get("corpus_shards")
    kind = f"{drafter['architecture']}, {drafter.get('num_modules', 1)} processing module(s)"
    if drafter.get("draft_vocab_size"):
        kind += f", draft vocabulary {drafter['draft_vocab_size']:,} tokens"
    lines = [
        f"# {method} drafter for {cfg.target}, campaign level {level}",
        "",
        f"{kind}.",
        "",
        "Stored in bf16 without anything derivable from the target: its embeddings and LM-head rows",
        "are read from the target at load time.",
        "",
        "## Training",
        "",
        (f"- Campaign `{folder}` ({'`' + command + '`' if command else 'python -m prism_spec.train.campaign'}),"
         f" level {level}: {entry['steps']:,} optimizer steps of {cfg.batch_size} examples"
         f" ({level_examples(state, level):,} examples), the same budget as the level's other methods."),
        (f"- Learning rate {cfg.lr:g} (PRISM's tuning stage {cfg.tuning_lr:g}), examples up to {cfg.max_length}"
         f" tokens, seed {cfg.seed}."),
        f"- Data: {', '.join(cfg.data)}" + (f", corpus shards {_ranges(shards)} (pinned when the level began)"
                                          if shards else "") + ".",
    ]
    if cfg.recipe_settings:
        lines.append("- Recipe settings: " + json.dumps(cfg.recipe_settings, sort_keys=True) + ".")
    lines.append(f"- {len(segments)} training segments, {hours:.1f} h in all, on: " + "; ".join(machines) + ".")
    heldout = entry.get("heldout", {}).get(method, {})
    accs = [(k, v) for k, v in sorted(heldout.items()) if k.startswith("acc_step")]
    if accs:
        lines += ["", "## Held-out top-1 accuracy (the campaign's held-out split: no level trains on it)", "",
                  ", ".join(f"step {k[len('acc_step'):]}: {v:.3f}" for k, v in accs) + "."]
    benches = entry.get("bench", {})
    if benches:
        lines += ["", "## Mean acceptance length on the six benchmarks", "",
                  "| evaluation | tree | questions per benchmark | new tokens | dtype | T | AL |", "|---|---|--:|--:|---|--:|--:|"]
        for key, bench in sorted(benches.items()):
            s = bench["settings"]
            for row in bench["rows"]:
                if row["method"] == method:
                    lines.append(f"| {key} | {s['tree']} | {s['questions_per_benchmark']} | {s['max_new_tokens']} |"
                                 f" {s['dtype']} | {row['temperature']:g} | {row['mean_acceptance_length']:.3f} |")
        lines += ["", "(`campaign eval`; \"replay\": T=0 acceptance replayed from the target's greedy continuations.)"]
    lines += ["", "Licence: Apache-2.0, as the project.", ""]
    return "\n".join(lines)


def trained_by(state: dict, method: str, level: int) -> list[dict]:
    """The segments whose training a method's level-``level`` drafter carries. PRISM's is HASS
    up to the level's snapshot (every earlier HASS segment, the level's first) plus the level's
    tuning; an earlier level's PRISM tuning is not in it."""
    segments = state["segments"]
    if method == "prism":
        return [s for s in segments if (s["level"] < level and s["method"] == "hass")
                or (s["level"] == level and (s["save"] == "hass-snapshot" or s["method"] == "prism"))]
    return [s for s in segments if s["method"] == method and s["level"] <= level]


def _ranges(numbers: list[int]) -> str:
    """[0, 1, 2, 5] -> '0-2, 5'."""
    out, start = [], None
    for i, n in enumerate(numbers):
        if start is None:
            start = n
        if i + 1 == len(numbers) or numbers[i + 1] != n + 1:
            out.append(f"{start}-{n}" if n != start else f"{n}")
            start = None
    return ", ".join(out)
