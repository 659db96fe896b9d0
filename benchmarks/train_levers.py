"""Which training settings teach a drafter fastest? Variants at equal budget, held-out accuracy.

Each variant trains the same recipe for the same number of steps and batch size from a fresh
drafter on the same corpus shards, changing only its own settings (``prism train --set``
keys; a key without a dot, such as ``lr``, is set on every stage). All are scored on the same
held-out corpus shards, the target's greedy replies to prompts no variant trained on:
held-out top-1 accuracy per aligned step, the quantity that decides acceptance.

The variants walk the same batches (the data order depends on the seed and the data, not on
the settings), so each batch's target features are computed once and kept on disk for every
variant (``data.feature_share`` in role "reuse"): every variant after the first costs the
drafter's own steps only, and so does a later run given the same ``--features`` folder. A
variant that trains on other data (``data.paths=...``) computes its own.

    python benchmarks/train_levers.py --corpus results/smollm2-135m/corpus --train-shards 0:56 \\
        --eval-shards 56 --steps 200 --variant "lr 2e-4" --variant "lr 6e-4: lr=6e-4" \\
        --variant "layer copy: drafter.init_from_target_layer=-1" --keep runs/levers --json out.json

``--variant "NAME: KEY=VALUE KEY=VALUE"`` (NAME alone: the recipe's settings plus the common
ones). A variant may start from a trained drafter (``init_from=DIR``) and train only some of
the recipe's stages (``stages.warmup.enabled=false``): PRISM's tuning stage from a HASS
snapshot, as the campaign trains it; ``--start DIR`` scores that drafter untrained first (with
``--steps 0``, alone). ``--keep DIR`` keeps each variant's drafter in DIR/<name> (for ``benchmarks/replay_al.py``).
Run it on an idle machine, or say it was not; accuracies do not depend on the machine's load.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import shutil
import tempfile
import time
from pathlib import Path

import torch
from common import write_rows

from prism_spec.train.config import StageConfig, build_config
from prism_spec.train.errors import ConfigError
from prism_spec.train.loop import Trainer
from prism_spec.train.overrides import parse_override

STAGE_FIELDS = {f.name for f in dataclasses.fields(StageConfig)}


@dataclasses.dataclass
class Variant:
    name: str
    settings: list[str]  # KEY=VALUE, as prism train --set takes them

    @classmethod
    def parse(cls, text: str) -> Variant:
        name, _, rest = text.partition(":")
        if not name.strip():
            raise ValueError(f"variant {text!r} has no name (NAME or 'NAME: KEY=VALUE ...')")
        settings = rest.split()
        for item in settings:
            parse_override(item)  # a clear error now, not after the first variant trained
        return cls(name.strip(), settings)

    def split(self) -> tuple[dict, list[str]]:
        """(fields set on every stage, dotted overrides)."""
        stages, dotted = {}, []
        for item in self.settings:
            key, value = parse_override(item)
            if key in STAGE_FIELDS:
                stages[key] = value
            else:
                dotted.append(item)
        return stages, dotted

    @property
    def slug(self) -> str:
        return re.sub(r"[^A-Za-z0-9._-]+", "-", self.name).strip("-") or "variant"


def shard_range(text: str) -> list[int]:
    a, _, b = text.partition(":")
    return list(range(int(a), int(b))) if b else [int(a)]


def common_values(args, shards: str, folder: Path, share: Path) -> dict:
    return {
        "target": args.target, "dtype": "float32", "mixed_precision": "no", "data.paths": [args.corpus],
        "data.corpus_shards": shard_range(shards), "data.max_length": args.max_length, "data.holdout": 0,
        "data.group_by_length": True, "drafter.draft_vocab_size": args.draft_vocab_size,
        "data.feature_share": str(share), "data.feature_share_role": "reuse",
        "output_dir": str(folder), "checkpoint_every": 0, "eval_every": 0, "log_every": 10, "seed": args.seed,
    }


def train_variant(args, variant: Variant, folder: Path, share: Path) -> tuple[Path, Trainer]:
    stages, dotted = variant.split()
    config = build_config(args.recipe, values=common_values(args, args.train_shards, folder, share),
                          all_stages={"steps": args.steps, "batch_size": args.batch_size, "lr": args.lr, **stages},
                          overrides=dotted)
    trainer = Trainer(config, quiet=True)
    return Path(trainer.run()), trainer


def evaluate(args, variant: Variant, drafter: Path, folder: Path, share: Path) -> dict[str, float]:
    """Held-out metrics of ``drafter`` over every example of the eval shards, through the
    trainer's own evaluation (no step runs). With holdout 0 the eval shards are this trainer's
    "training" examples, so their batches go through the shared features like training's."""
    stages, dotted = variant.split()
    values = {**common_values(args, args.eval_shards, folder, share), "init_from": str(drafter),
              "data.max_examples": args.eval_examples}
    # Scored on the eval shards alone, and the trained drafter scored, not the one it started from.
    dotted = [d for d in dotted if not d.startswith(("data.paths=", "init_from="))]
    config = build_config(args.recipe, values=values, all_stages={"steps": 1, "batch_size": args.batch_size, **stages},
                          overrides=dotted)
    trainer = Trainer(config, quiet=True)
    trainer.setup()
    trainer.eval_source = trainer.train_source
    trainer._prepare_model()
    stage = next(s for s in config.stages if s.enabled)
    metrics = trainer.evaluate(stage)
    metrics["examples"] = len(trainer.train_examples)
    return metrics


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", default="smollm2-135m")
    parser.add_argument("--corpus", required=True)
    parser.add_argument("--train-shards", required=True, help="A:B, the corpus shards to train on")
    parser.add_argument("--eval-shards", required=True, help="A:B or A, the held-out corpus shards")
    parser.add_argument("--variant", action="append", required=True, metavar="'NAME[: KEY=VALUE ...]'")
    parser.add_argument("--start", default=None, metavar="DRAFTER",
                        help="score this drafter first, untrained, with the first variant's settings: the "
                             "point the variants start from (their init_from)")
    parser.add_argument("--eval-examples", type=int, default=None, help="score on this many of them (default: all)")
    parser.add_argument("--recipe", default="eagle2")
    parser.add_argument("--steps", type=int, default=120, help="optimizer steps per variant (0: score --start only)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=2e-4, help="every variant's learning rate unless it sets lr "
                        "(default: the campaign's; the recipes' own 3e-5 is for tens of epochs)")
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--draft-vocab-size", type=int, default=16384)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--features", default=None, help="keep the target's features here for later runs "
                        "(the same batches: same shards, steps, batch size, seed; default: a temporary folder)")
    parser.add_argument("--keep", default=None, help="keep each variant's drafter in KEEP/<name>")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    if set(shard_range(args.train_shards)) & set(shard_range(args.eval_shards)):
        parser.error("--train-shards and --eval-shards overlap")
    try:
        variants = [Variant.parse(v) for v in args.variant]
    except (ValueError, ConfigError) as e:  # no name, or a malformed KEY=VALUE
        parser.error(str(e))
    if args.steps == 0 and not args.start:
        parser.error("--steps 0 trains nothing: it scores the --start drafter alone")
    if len({v.slug for v in variants}) != len(variants):
        parser.error("variant names must differ")
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        share = Path(args.features) if args.features else Path(scratch) / "features"
        if args.start:
            row = {"variant": f"start: {args.start}", "settings": [], "train_seconds": 0.0,
                   **scores(evaluate(args, variants[0], Path(args.start), Path(scratch) / "start", share))}
            rows.append(row)
            print(f"{'start (untrained)':<28} held-out {accuracies(row)}", flush=True)
            save(args, rows)
        for variant in variants if args.steps else []:  # --steps 0: score --start alone
            with tempfile.TemporaryDirectory() as tmp:
                t0 = time.perf_counter()
                drafter, trainer = train_variant(args, variant, Path(tmp) / "train", share)
                seconds = time.perf_counter() - t0
                metrics = evaluate(args, variant, drafter, Path(tmp) / "eval", share)
                if args.keep:
                    kept = Path(args.keep) / variant.slug
                    shutil.rmtree(kept, ignore_errors=True)
                    shutil.copytree(drafter, kept)
            stats = trainer.data_stats
            row = {"variant": variant.name, "settings": variant.settings,
                   "train_conversations": stats["train_conversations"], "corpus_replies": stats.get("corpus_replies"),
                   "train_seconds": round(seconds, 1), "features": trainer.shared_features, **scores(metrics)}
            rows.append(row)
            print(f"{variant.name:<28} {row['train_conversations']:>6} conversations, {args.steps} x {args.batch_size} "
                  f"in {seconds:.0f} s: held-out {accuracies(row)}", flush=True)
            save(args, rows)  # after every variant: a run cut short keeps what it finished


def scores(metrics: dict) -> dict:
    """A row's held-out part: the examples scored, accuracy per aligned step, losses."""
    return {"eval_examples": metrics["examples"],
            **{k: round(v, 4) for k, v in sorted(metrics.items()) if k.startswith(("acc_step", "loss"))}}


def accuracies(row: dict) -> str:
    return "  ".join(f"{k}={v:.3f}" for k, v in row.items() if k.startswith("acc_step"))


def save(args, rows: list[dict]) -> None:
    if args.json:
        write_rows(args.json, {k: v for k, v in vars(args).items() if k != "json"}, rows)

if __name__ == "__main__":
    main()
