"""Training throughput of the EAGLE-2, HASS and PRISM recipes: trained tokens per second with
the frozen target computing features online, as the campaign trains.

    python benchmarks/train_throughput.py --data results/smollm2-135m/corpus [--batch-size 8] \\
        [--max-length 512] [--steps 6] [--precisions bf16,no] [--json out.json]

Each (recipe, precision) runs ``--steps`` optimizer steps (the first is a warm-up and not
timed) through the real trainer, one after the other in one process, and reads the step times
from its log. "tokens" are the non-padding tokens of the batches (what the target and the
drafter actually process); "padded" is the batch size times the longest example of each
batch, what a padded batch computes; their ratio is the share lost to padding. PRISM's
warm-up stage is the HASS loss, so ``prism-tuning`` times its second stage. "target share" is
the part of the timed steps spent in the frozen target's forward (the online features), what
sharing features between methods or caching them would save. Run it on an idle machine.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from common import write_rows
from prism_spec.train import features
from prism_spec.train.config import build_config
from prism_spec.train.data_order import DataOrder
from prism_spec.train.loop import Trainer

RECIPES = {
    "eagle2": ("eagle2", False),
    "hass": ("hass", False),
    "prism-tuning": ("prism", True),
}


class TargetClock:
    """Seconds the frozen target spends computing features (every ``capture_batch`` call):
    the share of a step that features computed once and shared would save."""

    def __init__(self):
        self.calls: list[float] = []

    def __enter__(self):
        self._real = features.capture_batch

        def timed(*args, **kw):
            t = time.perf_counter()
            out = self._real(*args, **kw)
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.calls.append(time.perf_counter() - t)
            return out

        features.capture_batch = timed
        return self

    def __exit__(self, *exc):
        features.capture_batch = self._real


def run_one(args, recipe: str, tuning_only: bool, precision: str, grouped: bool, folder: Path) -> dict:
    values = {
        "target": args.target, "dtype": "bfloat16" if precision == "bf16" else "float32",
        "mixed_precision": precision, "data.paths": list(args.data), "data.max_length": args.max_length,
        "data.holdout": 8, "data.max_examples": max(args.batch_size * args.steps * 4, 64),
        "output_dir": str(folder), "checkpoint_every": 0, "eval_every": 0, "log_every": 1,
        "drafter.draft_vocab_size": args.draft_vocab_size, "data.group_by_length": grouped,
    }
    config = build_config(recipe, values=values, all_stages={"steps": args.steps, "batch_size": args.batch_size})
    if tuning_only:
        for stage in config.stages:
            stage.enabled = stage.objective == "tuning"
            stage.copy_module0_after = False
    trainer = Trainer(config, quiet=True)
    with TargetClock() as clock:
        trainer.run()
    log = [json.loads(line) for line in (folder / "train_log.jsonl").read_text().splitlines()]
    train = [r for r in log if r["split"] == "train"]
    times = [b["elapsed"] - a["elapsed"] for a, b in zip(train, train[1:])]  # steps 2.. (step 1 warms up)
    # The batches those timed steps saw (the same seeded order the trainer used).
    lengths = [int(e.input_ids.numel()) for e in trainer.train_source.examples]
    stage_index = next(i for i, s in enumerate(config.stages) if s.enabled)
    order = DataOrder(len(lengths), config.seed, stage_index, args.batch_size, 1, 1, 0,
                      lengths if grouped else None)
    tokens = padded = 0
    for step in range(1, args.steps):
        batch = [lengths[i] for i in order.indices(step, 0)]
        tokens += sum(batch)
        padded += max(batch) * len(batch)
    seconds = sum(times)
    # One feature capture per training step (eval_every=0; the final held-out pass comes last).
    target_s = sum(clock.calls[1:args.steps])
    return {"recipe": recipe + ("-tuning" if tuning_only else ""), "precision": precision,
            "group_by_length": grouped,
            "batch_size": args.batch_size, "max_length": args.max_length, "timed_steps": len(times),
            "s_per_step": round(seconds / len(times), 3), "tokens_per_s": round(tokens / seconds, 1),
            "padded_tokens_per_s": round(padded / seconds, 1), "padding_share": round(1 - tokens / padded, 3),
            "target_s_per_step": round(target_s / len(times), 3), "target_share": round(target_s / seconds, 3)}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", default="smollm2-135m")
    parser.add_argument("--data", nargs="+", required=True)
    parser.add_argument("--recipes", default="eagle2,hass,prism-tuning")
    parser.add_argument("--precisions", default="bf16,no")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--draft-vocab-size", type=int, default=16384)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--orders", default="plain,grouped",
                        help="data orders to compare: plain (random batches), grouped (data.group_by_length)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    for precision in args.precisions.split(","):
        for name in args.recipes.split(","):
            recipe, tuning_only = RECIPES[name]
            for order in args.orders.split(","):  # each recipe's orders back to back
                with tempfile.TemporaryDirectory() as tmp:
                    t0 = time.perf_counter()
                    row = run_one(args, recipe, tuning_only, precision, order == "grouped", Path(tmp))
                    row["wall_s"] = round(time.perf_counter() - t0, 1)
                rows.append(row)
                print(f"{row['recipe']:<13} {precision:<4} {order:<8} batch {args.batch_size} x <= {args.max_length}: "
                      f"{row['s_per_step']:.2f} s/step, {row['tokens_per_s']:.0f} tokens/s "
                      f"({row['padding_share']:.0%} of the padded batch is padding; "
                      f"the target's features {row['target_share']:.0%} of the step)", flush=True)
    write_rows(args.json, {k: v for k, v in vars(args).items() if k != "json"}, rows)


if __name__ == "__main__":
    main()
