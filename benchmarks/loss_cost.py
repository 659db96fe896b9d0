"""What a training step's loss costs with and without the logged accuracy.

The accuracy metric compares the drafter's argmax with the target's argmax over the *whole*
vocabulary, which needs the target's [rows, vocabulary] logits; the loss itself needs only the
draft-vocabulary rows. Training steps whose metrics are not logged skip it
(``compute_loss(..., accuracy=False)``). This times the drafter side of a step (loss forward +
backward) both ways on the same real batches, interleaved, and the target's feature forward
for scale.

    python benchmarks/loss_cost.py --data results/smollm2-135m/corpus [--recipe hass] \\
        [--batch-size 8] [--batches 4] [--repeats 2] [--threads 2] [--json out.json]

Run it on an idle machine.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch

from common import write_rows
from prism_spec.train.config import build_config
from prism_spec.train.data_order import DataOrder
from prism_spec.train.loop import Trainer
from prism_spec.train.objectives import ObjectiveConfig


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", default="smollm2-135m")
    parser.add_argument("--data", nargs="+", required=True)
    parser.add_argument("--recipe", default="hass", choices=["eagle2", "hass", "prism"])
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--batches", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--draft-vocab-size", type=int, default=16384)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        values = {"target": args.target, "dtype": "float32", "mixed_precision": "no", "data.paths": list(args.data),
                  "data.max_length": args.max_length, "data.holdout": 8, "data.group_by_length": True,
                  "data.max_examples": max(args.batch_size * args.batches * 8, 64), "output_dir": tmp,
                  "drafter.draft_vocab_size": args.draft_vocab_size}
        config = build_config(args.recipe, values=values, all_stages={"steps": 1, "batch_size": args.batch_size})
        trainer = Trainer(config, quiet=True)
        trainer.setup()
        trainer._prepare_model()
        stage = config.stages[-1]  # PRISM: its tuning stage
        module = trainer.accelerator.unwrap_model(trainer.model)
        module.objective = ObjectiveConfig.for_stage(stage)
        module.generator = trainer.generator
        lengths = [int(e.input_ids.numel()) for e in trainer.train_source.examples]
        order = DataOrder(len(lengths), 0, 0, args.batch_size, 1, 1, 0, lengths)
        batches, target_s, tokens = [], 0.0, 0
        for k in range(args.batches):
            idx = order.indices(k, 0)
            t = time.perf_counter()
            batches.append(trainer.train_source.batch(idx))
            target_s += time.perf_counter() - t
            tokens += sum(lengths[i] for i in idx)
        times = {True: 0.0, False: 0.0}
        for rep in range(args.repeats + 1):  # round 0 warms up
            for accuracy in (True, False) if rep % 2 else (False, True):
                module.accuracy = accuracy
                t = time.perf_counter()
                for batch in batches:
                    loss, _ = trainer.model(batch)
                    loss.backward()
                    trainer.model.zero_grad(set_to_none=True)
                if rep:
                    times[accuracy] += time.perf_counter() - t
    n = args.batches * args.repeats
    row = {"recipe": args.recipe, "batch_size": args.batch_size, "tokens_per_batch": round(tokens / args.batches),
           "target_features_s": round(target_s / args.batches, 3),
           "loss_s_with_accuracy": round(times[True] / n, 3), "loss_s_without_accuracy": round(times[False] / n, 3)}
    row["saved_share_of_step"] = round((row["loss_s_with_accuracy"] - row["loss_s_without_accuracy"])
                                       / (row["target_features_s"] + row["loss_s_with_accuracy"]), 3)
    print(f"{args.recipe}, batch {args.batch_size} (~{row['tokens_per_batch']} tokens): target features "
          f"{row['target_features_s']:.2f} s; loss forward+backward {row['loss_s_with_accuracy']:.2f} s with the "
          f"accuracy, {row['loss_s_without_accuracy']:.2f} s without ({row['saved_share_of_step']:.0%} of the step saved)")
    write_rows(args.json, {k: v for k, v in vars(args).items() if k != "json"}, [row])


if __name__ == "__main__":
    main()
