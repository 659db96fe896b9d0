"""``prism train``: train an EAGLE-2 / HASS / PRISM / stacked / standard drafter.

Wire it into a top-level argparse CLI with::

    from prism_spec.train.cli import add_train_parser, run_train
    add_train_parser(subparsers)          # adds the "train" sub-command, sets func=run_train

or run it standalone (also what multi-process launchers need)::

    python -m prism_spec.train --recipe prism --data a.jsonl --output-dir runs/p
    accelerate launch --num_processes 2 -m prism_spec.train --recipe prism ...
    torchrun --nproc_per_node 2 -m prism_spec.train --recipe prism ...
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Sequence

from ..options import TRAINING_SEED_MAX, dtype, positive_int, training_seed
from .config import build_config, recipe_descriptions
from .errors import ConfigError, TrainingError

DESCRIPTION = "Train a speculative-decoding drafter for a target model (EAGLE-2, HASS, PRISM, stacked, standard)."

EPILOG = """\
configuration layers (later ones win):
  1. the recipe (--recipe)                 2. a config file (--config, JSON / TOML / YAML)
  3. the flags below (--target, --data, --steps, ...)      4. --set key=value overrides

--set uses dotted keys into the config tree, with type checking; stages are addressed by index
or name, e.g.
  --set stages.0.lr=1e-4 --set stages.tuning.batch_size=8 --set drafter.input_layers=auto
  --set data.holdout=50 --set mixed_precision=bf16 --set stages.1.enabled=true
values parse as JSON when they can (numbers, true/false, null, [lists]), else as strings;
"a,b" is a list. Unknown keys fail with the list of valid ones. --print-config shows the tree.

recipes:
{recipes}

outputs in --output-dir: drafter/ (final drafter, loadable with load_drafter / `prism generate
--drafter`), stages/<i>-<name>/ (after each stage), train_log.jsonl, train_config.json,
checkpoints/ (training state for --resume; the last --set keep_checkpoints=N are kept).
"""


def _recipes_help() -> str:
    return "\n".join(f"  {name:<10} {desc}" for name, desc in recipe_descriptions().items())


def configure_parser(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--recipe", metavar="NAME",
                   help=f"training recipe: {', '.join(recipe_descriptions())} (default: prism, or the config file's 'recipe')")
    p.add_argument("--target", metavar="NAME_OR_PATH",
                   help="target model: 'smollm2-135m' (embedded default), a hub id or a local folder")
    p.add_argument("--data", nargs="+", metavar="FILE",
                   help="training data files or folders (ShareGPT / messages, EAGLE question files, Alpaca, "
                        "prompt+answer JSON/JSONL such as GSM8K, .txt prompts); conversations without an "
                        "assistant reply are skipped (regenerate them with the target first)")
    p.add_argument("--output-dir", metavar="DIR", help="where drafters, logs and checkpoints go")
    p.add_argument("--config", metavar="FILE", help="config file (.json, .toml, or .yaml with pyyaml)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one config value (repeatable), e.g. stages.0.lr=1e-4")
    p.add_argument("--steps", type=positive_int, metavar="N",
                   help="optimizer steps for EVERY stage (replaces the recipe's epochs)")
    p.add_argument("--epochs", type=float, metavar="E", help="passes over the training data for every stage")
    p.add_argument("--max-length", type=positive_int, metavar="N", help="tokens per example (default 2048)")
    p.add_argument("--max-examples", type=positive_int, metavar="N",
                   help="train on at most N conversations (a seeded subset)")
    p.add_argument("--batch-size", type=positive_int, metavar="N", help="examples per process per micro-batch, every stage")
    p.add_argument("--grad-accum", type=positive_int, metavar="N", help="micro-batches per optimizer step, every stage")
    p.add_argument("--lr", type=float, metavar="LR", help="learning rate of EVERY stage (use --set stages.i.lr for one)")
    p.add_argument("--dtype", type=dtype, metavar="DTYPE", help="dtype of the frozen target (float32, bf16, fp16)")
    p.add_argument("--mixed-precision", choices=["no", "bf16", "fp16"],
                   help="autocast for the drafter (its master weights stay float32); fp16 needs a GPU")
    p.add_argument("--save-dtype", type=dtype, metavar="DTYPE", help="dtype of the saved drafter folders, e.g. bf16 for shipping")
    p.add_argument("--seed", type=training_seed, metavar="S",
                   help=f"seed of initialisation, data order and noise, 0..{TRAINING_SEED_MAX}")
    p.add_argument("--init-from", metavar="DRAFTER_DIR",
                   help="start from this trained feature drafter instead of a fresh one (fine-tuning); its "
                        "shape must match the recipe's drafter. With PRISM, --set stages.warmup.enabled=false "
                        "keeps its later modules (the warm-up ends by copying module 0 over them)")
    p.add_argument("--time-limit", type=float, metavar="SECONDS",
                   help="stop after the step that passes SECONDS of training and save the drafter as it is "
                        "(later stages are skipped)")
    p.add_argument("--checkpoint-every", type=int, metavar="N", help="training checkpoint every N optimizer steps (0: stage ends)")
    p.add_argument("--eval-every", type=int, metavar="N", help="validation every N optimizer steps (0: stage ends)")
    p.add_argument("--log-every", type=positive_int, metavar="N", help="train_log.jsonl line every N steps")
    feats = p.add_mutually_exclusive_group()
    feats.add_argument("--online", action="store_true",
                       help="compute the target's features inside the trainer (frozen target, no grad; the default)")
    feats.add_argument("--feature-cache", metavar="DIR",
                       help="offline features: capture the target's hidden states once into DIR (reused when present)")
    p.add_argument("--capture-only", action="store_true",
                        help="with --feature-cache: capture the target's features for the data, then stop "
                             "(one capture can serve several drafters trained on the same data)")
    resume = p.add_mutually_exclusive_group()
    resume.add_argument("--resume", nargs="?", const=True, default=None, metavar="CHECKPOINT",
                        help="continue an interrupted run exactly: from --output-dir/checkpoints/latest, or from "
                             "the given checkpoint folder (starts fresh when there is none)")
    resume.add_argument("--overwrite", action="store_true",
                        help="start over in an --output-dir that holds checkpoints of an earlier run (deletes them)")
    p.add_argument("--print-config", action="store_true", help="print the resolved config as JSON and exit")
    p.add_argument("--list-recipes", action="store_true", help="list the recipes and exit")
    p.add_argument("--quiet", action="store_true", help="no progress bar or messages (errors still print)")
    return p


def add_train_parser(subparsers) -> argparse.ArgumentParser:
    """Add the ``train`` sub-command to an argparse ``subparsers`` object."""
    p = subparsers.add_parser(
        "train", help="train a drafter (EAGLE-2 / HASS / PRISM / stacked / standard)", description=DESCRIPTION,
        epilog=EPILOG.format(recipes=_recipes_help()), formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    configure_parser(p)
    p.set_defaults(func=run_train)
    return p


def build_parser(prog: str = "prism train") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=DESCRIPTION, epilog=EPILOG.format(recipes=_recipes_help()),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    return configure_parser(p)


def config_from_args(args: argparse.Namespace, check_files: bool = True):
    values: dict = {}
    for flag, key in (("target", "target"), ("output_dir", "output_dir"), ("max_length", "data.max_length"),
                      ("max_examples", "data.max_examples"), ("dtype", "dtype"),
                      ("mixed_precision", "mixed_precision"), ("save_dtype", "save_dtype"), ("seed", "seed"),
                      ("checkpoint_every", "checkpoint_every"), ("eval_every", "eval_every"),
                      ("log_every", "log_every"), ("init_from", "init_from"), ("time_limit", "time_limit_s")):
        value = getattr(args, flag, None)
        if value is not None:
            values[key] = value
    if args.data:
        values["data.paths"] = list(args.data)
    if args.feature_cache:
        values["data.feature_cache"] = args.feature_cache
    elif args.online:
        values["data.feature_cache"] = None
    all_stages: dict = {}
    if args.steps is not None:
        all_stages.update(steps=args.steps, epochs=None)
    elif args.epochs is not None:
        all_stages.update(steps=None, epochs=args.epochs)
    for flag, key in (("batch_size", "batch_size"), ("grad_accum", "grad_accum"), ("lr", "lr")):
        if getattr(args, flag, None) is not None:
            all_stages[key] = getattr(args, flag)
    recipe = args.recipe or (None if args.config else "prism")
    return build_config(recipe=recipe, config_file=args.config, values=values, overrides=args.overrides,
                        all_stages=all_stages, check_files=check_files)


def run_train(args: argparse.Namespace) -> int:
    """Run ``prism train`` from parsed arguments; returns the process exit code."""
    if args.list_recipes:
        print(_recipes_help())
        return 0
    from .loop import capture_only, train

    try:
        config = config_from_args(args, check_files=not args.print_config)
        if args.print_config:
            print(json.dumps(config.to_dict(), indent=2))
            return 0
        if args.capture_only:
            if not config.data.feature_cache:
                raise ConfigError("--capture-only needs --feature-cache DIR")
            capture_only(config, quiet=args.quiet)
            return 0
        final = train(config, resume=args.resume, quiet=args.quiet, overwrite=args.overwrite)
    except (ConfigError, TrainingError) as e:
        print(f"prism train: error: {e}", file=sys.stderr)
        return 2
    if not args.quiet:
        _print_summary(final)
    return 0


def _print_summary(final) -> None:
    from accelerate.state import PartialState

    if not PartialState().is_main_process:
        return
    log = final.parent / "train_log.jsonl"
    last_eval = None
    if log.exists():
        for line in log.read_text().splitlines():
            record = json.loads(line)
            if record.get("split") == "eval":
                last_eval = record
    print(f"drafter: {final}")
    if last_eval:
        accs = {k: v for k, v in last_eval["metrics"].items() if k.startswith("acc_step")}
        print("held-out top-1 accuracy per draft step: " + ", ".join(f"{k}={v:.3f}" for k, v in accs.items()))


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser("python -m prism_spec.train").parse_args(argv)
    return run_train(args)
