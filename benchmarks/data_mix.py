"""Train on the target's own replies only, or mix the datasets' own answers in?

Each variant trains the same recipe for the same number of steps and batch size (equal
budget) from a fresh drafter, on the corpus's training shards alone or together with data
files (whose answers were written by people or other models, not by the target). All are then
scored on the same held-out corpus shards, the target's greedy replies to prompts no variant
trained on: held-out top-1 accuracy per aligned step, the quantity that decides acceptance.

    python benchmarks/data_mix.py --corpus results/smollm2-135m/corpus --train-shards 0:56 \
        --eval-shards 56 --mix ../shared/data/train/gsm8k_train.jsonl ... --steps 120 --json out.json

Run it on an idle machine (or say it was not).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from common import write_rows
from prism_spec.train.config import build_config
from prism_spec.train.loop import Trainer


def shard_range(text: str) -> list[int]:
    a, _, b = text.partition(":")
    return list(range(int(a), int(b))) if b else [int(a)]


def train_variant(args, paths: list[str], folder: Path) -> tuple[Path, dict]:
    values = {
        "target": args.target, "dtype": "float32", "mixed_precision": "no", "data.paths": paths,
        "data.corpus_shards": shard_range(args.train_shards), "data.max_length": args.max_length,
        "data.holdout": 0, "data.group_by_length": True, "drafter.draft_vocab_size": args.draft_vocab_size,
        "output_dir": str(folder), "checkpoint_every": 0, "eval_every": 0, "log_every": 10, "seed": args.seed,
    }
    config = build_config(args.recipe, values=values, all_stages={"steps": args.steps, "batch_size": args.batch_size})
    trainer = Trainer(config, quiet=True)
    final = trainer.run()
    return Path(final), trainer.data_stats


def evaluate(args, drafter: Path, folder: Path) -> dict[str, float]:
    """Held-out metrics of ``drafter`` over every example of the eval shards (through the
    trainer's own evaluation: no step runs)."""
    values = {
        "target": args.target, "dtype": "float32", "mixed_precision": "no", "data.paths": [args.corpus],
        "data.corpus_shards": shard_range(args.eval_shards), "data.max_length": args.max_length,
        "data.holdout": 0, "init_from": str(drafter), "output_dir": str(folder),
        "drafter.draft_vocab_size": args.draft_vocab_size,
    }
    config = build_config(args.recipe, values=values, all_stages={"steps": 1, "batch_size": args.batch_size})
    trainer = Trainer(config, quiet=True)
    trainer.setup()  # with holdout 0 the eval shards are its "training" examples, never trained on here
    trainer.eval_source = trainer._source(trainer.train_examples, "holdout")
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
    parser.add_argument("--mix", nargs="+", required=True, help="data files whose own answers are mixed in")
    parser.add_argument("--recipe", default="eagle2")
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--draft-vocab-size", type=int, default=16384)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    if set(shard_range(args.train_shards)) & set(shard_range(args.eval_shards)):
        parser.error("--train-shards and --eval-shards overlap")
    if args.threads:
        torch.set_num_threads(args.threads)
    variants = {"target replies only": [args.corpus], "target replies + dataset answers": [args.corpus, *args.mix]}
    rows = []
    for name, paths in variants.items():
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            drafter, stats = train_variant(args, paths, Path(tmp) / "train")
            seconds = time.perf_counter() - t0
            metrics = evaluate(args, drafter, Path(tmp) / "eval")
        row = {"variant": name, "train_conversations": stats["train_conversations"],
               "corpus_replies": stats.get("corpus_replies"), "train_seconds": round(seconds, 1),
               "eval_examples": metrics.pop("examples"),
               **{k: round(v, 4) for k, v in sorted(metrics.items()) if k.startswith(("acc_step", "loss"))}}
        rows.append(row)
        accs = "  ".join(f"{k}={v:.3f}" for k, v in row.items() if k.startswith("acc_step"))
        print(f"{name:<34} {row['train_conversations']:>6} conversations ({row['corpus_replies']} target replies), "
              f"{args.steps} x {args.batch_size}: held-out {accs}", flush=True)
    write_rows(args.json, {k: v for k, v in vars(args).items() if k != "json"}, rows)


if __name__ == "__main__":
    main()
