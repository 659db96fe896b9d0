"""The training loop: stages run in order through one ``accelerate.Accelerator``.

The same code runs in one CPU process, in several processes (gloo on CPU, NCCL on GPUs: DDP),
or under FSDP / DeepSpeed through an accelerate config file. What it guarantees:

* **Deterministic data order.** Each stage reads an endless stream of training examples: epoch
  ``e`` is a permutation seeded by (seed, stage, e); optimizer step ``s`` takes the next
  ``batch_size * grad_accum * world_size`` stream positions, sharded by rank. The position in
  the data is therefore a function of the step number alone.
* **Exact resume.** A training checkpoint holds the drafter, the optimizer, the scheduler, the
  RNG states of every rank (python, numpy, torch, CUDA, the objective's noise generator), the
  stage index and the step inside it; it is written to a temporary folder and moved into place
  with one ``os.replace``. A run killed at any point and resumed from its latest checkpoint
  ends with bitwise the same weights as an uninterrupted run (same world size, same hardware).
* **Outputs.** ``output_dir/stages/<i>-<name>/`` (the drafter after stage i, a folder
  ``load_drafter`` reads), ``output_dir/drafter/`` (the final drafter), ``train_log.jsonl``
  (one JSON line per logged step and per validation) and ``train_config.json`` (the resolved
  configuration).

The trainer's parts live beside it: :mod:`.examples` (data -> tokenised examples -> batches),
:mod:`.data_order`, :mod:`.checkpoints`, :mod:`.build` (the drafter trained and saved),
:mod:`.engine` (the accelerate side: accelerator, wrapped module, evaluation, schedule) and
:mod:`.metrics`.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import sys
import time
from pathlib import Path

import torch
from accelerate.utils import DistributedType

from ..targets.hf import Target, parse_dtype
from .build import (build_drafter, export_drafter, load_init_state, read_init_state, resolve_input_layers,
                    resolve_target_path)
from .checkpoints import (CHECKPOINTS, config_changes, config_fingerprint, find_latest_checkpoint, load_model_state,
                          read_checkpoint, resolve_resume, restore_training_state, save_checkpoint, state_sha256)
from .config import StageConfig, TrainConfig, stage_total_steps
from .data_order import DataOrder, mix_seed
from .engine import LossModule, evaluate_heldout, hf_progress_bars, linear_schedule, make_accelerator, progress_bar
from .errors import ConfigError, TrainingError
from .examples import BatchSource, Example, data_summary, load_examples, offline_features
from .metrics import aggregate_metrics, metric_floats
from .objectives import ObjectiveConfig
from .vocab import build_draft_vocab

#: Test hook: ``PRISM_TRAIN_KILL_AFTER_CHECKPOINT=k`` SIGKILLs the process right after the
#: checkpoint of global optimizer step ``k`` is in place (simulates a crash / preemption).
KILL_ENV = "PRISM_TRAIN_KILL_AFTER_CHECKPOINT"
#: Test / debugging hook: when set, every rank writes ``output_dir/digest-rank<r>.txt`` holding
#: the sha256 of its own final drafter state dict (data-parallel ranks must agree bitwise).
DIGEST_ENV = "PRISM_TRAIN_RANK_DIGEST"

LOG_FILE = "train_log.jsonl"
CONFIG_FILE = "train_config.json"

#: Set by :func:`request_stop` (a signal handler): a run with a time limit stops after its
#: current step as if the limit had passed, saving the drafter where it is.
_STOP = {"requested": False}


def request_stop(*_signal_args) -> None:
    """Ask time-limited runs to stop after the current optimizer step (usable as a signal
    handler: ``signal.signal(signal.SIGTERM, request_stop)``)."""
    _STOP["requested"] = True


def stop_requested() -> bool:
    return _STOP["requested"]


def _stage_folder(output_dir: Path, index: int, stage: StageConfig) -> Path:
    safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in stage.name)
    return output_dir / "stages" / f"{index}-{safe}"


# =========================================================================== trainer
class Trainer:
    def __init__(self, config: TrainConfig, resume: bool | str | os.PathLike | None = None, quiet: bool = False,
                 overwrite: bool = False):
        config.validate()
        if parse_dtype(config.dtype) in (torch.float16, torch.bfloat16) and config.mixed_precision == "no":
            raise ConfigError(
                f"dtype {config.dtype}: the drafter trains with float32 master weights, so a half-precision "
                "target needs mixed_precision bf16 or fp16 (autocast mixes the two)"
            )
        self.config = config
        self.quiet = quiet
        self.stopped_at: tuple[int, int] | None = None  # (stage, step) where a time limit stopped training
        self.output_dir = Path(config.output_dir)
        self.accelerator = make_accelerator(config)
        acc = self.accelerator
        if config.mixed_precision == "fp16" and acc.device.type == "cpu":
            raise ConfigError("mixed_precision fp16 needs a GPU; use bf16 (or no) on CPU")
        if acc.distributed_type == DistributedType.DEEPSPEED:
            raise ConfigError(
                "DeepSpeed is not supported by prism train (a drafter is one decoder layer plus an fc: "
                "use DDP, or FSDP from an accelerate config file, to spread training over GPUs)"
            )
        self.rank, self.world = acc.process_index, acc.num_processes
        self.is_main = acc.is_main_process
        self.resume_from = resolve_resume(resume, self.output_dir) if resume else None
        if resume is True and self.resume_from is None:
            self._print(f"[train] no checkpoint in {self.output_dir / CHECKPOINTS}: starting fresh")
        if not resume and not overwrite and find_latest_checkpoint(self.output_dir) is not None:
            raise TrainingError(
                f"{self.output_dir} holds checkpoints of an earlier run: pass --resume to continue it "
                "or --overwrite to start over (which deletes them)"
            )

    # ------------------------------------------------------------------ output
    def _print(self, *args):
        if self.is_main and not self.quiet:
            from tqdm.auto import tqdm

            tqdm.write(" ".join(str(a) for a in args), file=sys.stderr)

    def _log(self, record: dict):
        if self.is_main:
            with open(self.output_dir / LOG_FILE, "a") as f:
                f.write(json.dumps(record) + "\n")

    # ------------------------------------------------------------------ setup
    def setup(self):
        """Everything that can fail on bad input runs here, before any training work."""
        with hf_progress_bars(self.is_main and not self.quiet):
            self._setup()

    def _setup(self):
        from accelerate.utils import set_seed
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

        config, acc = self.config, self.accelerator
        set_seed(config.seed)
        with acc.main_process_first():  # the embedded default target is converted once, by rank 0
            path = resolve_target_path(config.target)
        try:
            target_config = AutoConfig.from_pretrained(path)
            tokenizer = AutoTokenizer.from_pretrained(path)
        except (OSError, ValueError) as e:
            raise ConfigError(f"cannot load target {config.target!r}: {e}") from None
        num_layers = int(target_config.num_hidden_layers)
        self.input_layers = resolve_input_layers(config, num_layers)
        if config.drafter.trains_as == "standard" and not 1 <= config.drafter.standard_layers <= num_layers:
            raise ConfigError(f"drafter.standard_layers must be in 1..{num_layers} for {config.target}")
        self.tokenizer = tokenizer
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
        t0 = time.perf_counter()
        self.train_examples, self.holdout_examples, self.data_stats = load_examples(config, tokenizer)
        for line in data_summary(self.data_stats, time.perf_counter() - t0, config.data.max_length):
            self._print(line)
        self.stage_steps = {
            i: stage_total_steps(s, len(self.train_examples), self.world) for i, s in config.enabled_stages()
        }
        # The frozen target (its embedding and head are part of every feature drafter).
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=parse_dtype(config.dtype), attn_implementation="sdpa"
        ).to(acc.device)
        self.target = Target(model, tokenizer, name=config.target)
        if acc.device.type == "cpu":
            # Its forwards (feature capture, online features) run without autograd: prepacked
            # CPU weights make them faster (docs/performance.md); autocast steps aside by itself.
            self.target.pack_weights()
        init_state = None
        if config.init_from and self.resume_from is None:
            init_state = read_init_state(config, self.target, self.input_layers)
            self._print(f"[train] starting from the drafter in {config.init_from}")
        d2t = None
        if init_state is not None and "d2t" in init_state:
            d2t = init_state["d2t"]  # the weights were trained on this vocabulary
        elif config.drafter.draft_vocab_size:
            # From the training split only, so held-out accuracy stays honest; deterministic,
            # so every rank builds the same map.
            d2t = build_draft_vocab(
                self.train_examples, self.target.vocab_size, config.drafter.draft_vocab_size,
                include=sorted(self.target.eos_token_ids),
            )
        drafter = build_drafter(config, self.target, self.input_layers, d2t)
        if init_state is not None:
            load_init_state(drafter, init_state)
        self.loss_module = LossModule(drafter)
        self.generator = torch.Generator(device=acc.device)
        if config.drafter.trains_as == "standard":
            self.feature_layers = None
        else:
            self.feature_layers = tuple(self.input_layers) if self.input_layers else None
        self.train_source = self._source(self.train_examples, "train")
        self.eval_source = self._source(self.holdout_examples, "holdout") if self.holdout_examples else None
        if self.is_main:
            self.output_dir.mkdir(parents=True, exist_ok=True)
        acc.wait_for_everyone()

    def _prepare_model(self):
        """Hand the drafter to accelerate (DDP / FSDP wrapping) -- after any checkpoint load,
        so resumed weights go into the plain module whatever the wrapper."""
        self.model = self.accelerator.prepare(self.loss_module)

    def _source(self, examples: list[Example], split: str) -> BatchSource:
        dataset = None
        if self.config.data.feature_cache:
            folder = Path(self.config.data.feature_cache) / split
            dataset = offline_features(self.accelerator, self.target, examples, folder, self.feature_layers,
                                       parse_dtype(self.config.data.feature_dtype), self.is_main and not self.quiet)
        shared = None
        if self.config.data.feature_share and split == "train":
            from .shared_features import SharedFeatures

            # Per process: each rank's batches are its own.
            folder = Path(self.config.data.feature_share) / f"rank-{self.rank}"
            shared = SharedFeatures(folder, self.config.data.feature_share_role, self.target, self.feature_layers)
        return BatchSource(examples, self.target, self.feature_layers, self.accelerator.device, self.pad_id, dataset,
                           shared)

    # ------------------------------------------------------------------ checkpoints
    def _checkpoint(self, stage_index: int, stage_step: int, global_step: int, optimizer, scheduler, elapsed: float):
        state = None
        if self.is_main:
            log = self.output_dir / LOG_FILE
            state = {
                "stage_index": stage_index, "stage_step": stage_step, "global_step": global_step,
                "world_size": self.world, "elapsed": elapsed,
                "log_bytes": log.stat().st_size if log.exists() else 0,
                "config": config_fingerprint(self.config.to_dict()),
            }
        save_checkpoint(self.accelerator, self.model, self.generator, self.output_dir / CHECKPOINTS, global_step, state,
                        optimizer, scheduler, keep=self.config.keep_checkpoints)
        kill = os.environ.get(KILL_ENV)
        if kill and int(kill) == global_step:
            sys.stderr.flush()
            os.kill(os.getpid(), signal.SIGKILL)

    def _load_checkpoint(self, folder: Path) -> dict:
        state = read_checkpoint(folder, self.world)
        changed = config_changes(state, self.config.to_dict())
        if changed:
            self._print("[train] warning: the config differs from the checkpoint's: " + "; ".join(changed[:8]))
        self.loss_module.drafter.load_state_dict(load_model_state(folder))
        log = self.output_dir / LOG_FILE
        if self.is_main and log.exists() and log.stat().st_size > state["log_bytes"]:
            with open(log, "r+b") as f:  # drop lines written after the checkpoint
                f.truncate(state["log_bytes"])
        return state

    # ------------------------------------------------------------------ evaluation
    def evaluate(self, stage: StageConfig) -> dict[str, float]:
        """Held-out metrics under ``stage``'s objective ({} without held-out data)."""
        if self.eval_source is None:
            return {}
        return evaluate_heldout(self.model, self.eval_source, stage, self.accelerator)

    # ------------------------------------------------------------------ training
    def _optimizer(self, index: int, stage: StageConfig, total: int, start: int = 0):
        params = [p for p in self.model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=stage.lr, betas=tuple(stage.betas), weight_decay=stage.weight_decay)
        warmup = int(stage.warmup_ratio * total)
        # Decided by the config alone, so a run resumed from a checkpoint rebuilds the same schedule.
        on_trained_weights = index != self.config.enabled_stages()[0][0] or self.config.init_from is not None
        scheduler = linear_schedule(optimizer, warmup, total, start, stage.rewarm_steps if on_trained_weights else 0)
        return self.accelerator.prepare_optimizer(optimizer), scheduler

    def run(self) -> Path:
        """Train every enabled stage (resuming when asked); returns the final drafter's folder."""
        with hf_progress_bars(self.is_main and not self.quiet):
            return self._run()

    def _run(self) -> Path:
        config, acc = self.config, self.accelerator
        self.setup()
        start_stage, start_step, global_step, elapsed0 = 0, 0, 0, 0.0
        resume_state = None
        if self.resume_from is not None:
            resume_state = self._load_checkpoint(self.resume_from)
            start_stage, start_step = resume_state["stage_index"], resume_state["stage_step"]
            global_step, elapsed0 = resume_state["global_step"], resume_state["elapsed"]
            self._print(f"[train] resuming from {self.resume_from} (stage {start_stage}, step {start_step})")
        elif config.start_step:
            # A stage cut by a time limit, continued from its saved drafter (init_from): same
            # schedule position and data order, a fresh optimizer.
            start_stage = next(i for i, s in enumerate(config.stages) if s.enabled)
            start_step = global_step = config.start_step
            if start_step >= self.stage_steps[start_stage]:
                raise ConfigError(f"start_step {start_step} is not inside stage {start_stage} "
                                  f"({self.stage_steps[start_stage]} steps)")
            self._print(f"[train] continuing stage {start_stage} at step {start_step} from {config.init_from}")
        if self.resume_from is None and self.is_main:
            # A fresh run in a used folder: old checkpoints and logs would mix with the new run.
            stale_paths = [self.output_dir / n for n in (CHECKPOINTS, LOG_FILE, "stages", "drafter")]
            for stale in stale_paths + list(self.output_dir.glob("digest-rank*.txt")):
                if stale.is_dir():
                    shutil.rmtree(stale)
                elif stale.exists():
                    stale.unlink()
        self._prepare_model()
        self._write_config()
        acc.wait_for_everyone()
        t_start = time.perf_counter() - elapsed0
        self._t_started = time.perf_counter()  # the time limit counts this run's training only
        self.stopped_at = None
        self.step_seconds = 0.0  # this run's optimizer steps alone (no loading, evaluation or saving)
        self.shared_features = None  # what data.feature_share saved this run (role, batches read, written)
        last_folder = None
        for index, stage in enumerate(config.stages):
            if not stage.enabled:
                continue
            if index < start_stage:
                last_folder = _stage_folder(self.output_dir, index, stage)
                continue
            resuming = (resume_state is not None or config.start_step > 0) and index == start_stage
            global_step = self._run_stage(index, stage, start_step if resuming else 0, global_step, t_start,
                                          resume_state if resuming else None)
            last_folder = self._save_drafter(_stage_folder(self.output_dir, index, stage), index, stage)
            if self.stopped_at is not None:
                self._print(f"[train] time limit of {config.time_limit_s} s reached: stopped in stage {index} "
                            f"after step {self.stopped_at[1]}; later stages skipped")
                break
        shared = self.train_source.shared
        if shared is not None:
            self.shared_features = {"role": shared.role, "read": shared.hits, "computed": shared.misses,
                                    "written": shared.written}
            self._print(f"[train] shared features ({shared.role}): {shared.hits} batches read, "
                        f"{shared.written} written")
        final = self.output_dir / "drafter"
        if last_folder is None:
            raise TrainingError("no enabled stage ran")
        self._save_drafter(final, None, None)
        if os.environ.get(DIGEST_ENV):
            digest = state_sha256(acc.unwrap_model(self.model).drafter)
            (self.output_dir / f"digest-rank{self.rank}.txt").write_text(digest + "\n")
        acc.wait_for_everyone()
        self._print(f"[train] done in {time.perf_counter() - t_start:.1f} s: drafter in {final}")
        return final

    def _run_stage(self, index: int, stage: StageConfig, start_step: int, global_step: int, t_start: float,
                   resume_state: dict | None) -> int:
        config, acc = self.config, self.accelerator
        total = self.stage_steps[index]
        unwrapped = acc.unwrap_model(self.model)
        unwrapped.objective = ObjectiveConfig.for_stage(stage)
        unwrapped.generator = self.generator
        continued = resume_state is None and start_step > 0  # config.start_step: fresh optimizer
        optimizer, scheduler = self._optimizer(index, stage, total, start_step if continued else 0)
        if resume_state is not None:
            if start_step > 0:  # mid-stage: the optimizer and schedule go on where they were
                restore_training_state(self.resume_from, self.rank, self.generator, optimizer, scheduler, acc.scaler)
            else:
                restore_training_state(self.resume_from, self.rank, self.generator)
        if start_step == 0:  # each stage's noise stream starts from its own seed
            self.generator.manual_seed(mix_seed(config.seed, index, self.rank))
        elif continued:  # and a continued stage's from the step it continues at
            self.generator.manual_seed(mix_seed(config.seed, index, self.rank, start_step))
        lengths = [int(e.input_ids.numel()) for e in self.train_source.examples] if config.data.group_by_length else None
        order = DataOrder(len(self.train_source), config.seed, index, stage.batch_size, stage.grad_accum,
                          self.world, self.rank, lengths)
        params = [p for p in self.model.parameters() if p.requires_grad]
        self._print(
            f"[train] stage {index} '{stage.name}' ({stage.objective}): {total} steps, lr {stage.lr}, "
            f"global batch {stage.batch_size * stage.grad_accum * self.world} "
            f"({self.world} process{'es' if self.world > 1 else ''})"
        )
        bar = progress_bar(total=total, initial=start_step, desc=f"stage {index} {stage.name}",
                           disable=not self.is_main or self.quiet, dynamic_ncols=True, leave=True)
        self.model.train()
        for step in range(start_step, total):
            t_step = time.perf_counter()
            sums: dict[str, float] = {}
            # Only logged steps report metrics: the others skip the accuracy's extra work.
            unwrapped.accuracy = (step + 1) % config.log_every == 0 or step + 1 == total
            for micro in range(stage.grad_accum):
                batch = self.train_source.batch(order.indices(step, micro))
                sync = micro == stage.grad_accum - 1
                with contextlib.nullcontext() if sync else acc.no_sync(self.model):
                    loss, metrics = self.model(batch)
                    acc.backward(loss / stage.grad_accum)
                m = metric_floats(metrics)
                m["loss"] = float(loss.detach().float())
                for k, v in m.items():
                    sums[k] = sums.get(k, 0.0) + v
            if stage.clip:
                if stage.clip_mode == "value":
                    acc.clip_grad_value_(params, stage.clip)
                else:
                    acc.clip_grad_norm_(params, stage.clip)
            optimizer.step()
            lr = scheduler.get_last_lr()[0]
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            global_step += 1
            self.step_seconds += time.perf_counter() - t_step
            done = step + 1
            if self.is_main:
                bar.set_postfix(loss=f"{sums['loss'] / stage.grad_accum:.4f}", lr=f"{lr:.2e}", refresh=False)
                bar.update(1)
            if done % config.log_every == 0 or done == total:
                values = aggregate_metrics(sums, stage.grad_accum, acc)
                self._log({
                    "split": "train", "stage": index, "stage_name": stage.name, "step": done,
                    "global_step": global_step, "epoch": round(order.epoch_at(done), 4),
                    "loss": values.pop("loss"), "lr": lr, "metrics": values,
                    "elapsed": round(time.perf_counter() - t_start, 3),
                })
            cut = done < total and self._out_of_time()
            if (config.eval_every and done % config.eval_every == 0) or done == total or (cut and config.eval_when_cut):
                self._eval_and_log(index, stage, done, global_step, t_start)
            if done == total:
                if stage.copy_module0_after:
                    from .objectives import copy_module0_into_others

                    with torch.no_grad():
                        copy_module0_into_others(unwrapped.drafter)
                # Stage boundary: resume goes straight to the next stage.
                self._checkpoint(index + 1, 0, global_step, None, None, time.perf_counter() - t_start)
            elif config.checkpoint_every and global_step % config.checkpoint_every == 0:
                self._checkpoint(index, done, global_step, optimizer, scheduler, time.perf_counter() - t_start)
            if cut:
                self.stopped_at = (index, done)
                break
        bar.close()
        return global_step

    def _out_of_time(self) -> bool:
        """Every process stops at the same step: rank 0's clock decides."""
        limit = self.config.time_limit_s
        if limit is None:
            return False
        late = time.perf_counter() - self._t_started > limit or stop_requested()
        flag = torch.tensor([float(late)], device=self.accelerator.device)
        if self.world > 1:
            flag = self.accelerator.reduce(flag, reduction="max")
        return bool(flag.item())

    def _eval_and_log(self, index, stage, done, global_step, t_start):
        metrics = self.evaluate(stage)
        if not metrics:
            return
        accs = sorted((k for k in metrics if k.startswith("acc_step")), key=lambda k: int(k[8:] or 0))
        shown = "  ".join(f"{k}={metrics[k]:.3f}" for k in accs)
        self._print(f"[eval] stage {index} step {done}: loss={metrics.get('loss', float('nan')):.4f}  {shown}")
        self._log({
            "split": "eval", "stage": index, "stage_name": stage.name, "step": done, "global_step": global_step,
            "loss": metrics.get("loss"), "metrics": {k: v for k, v in metrics.items() if k != "loss"},
            "elapsed": round(time.perf_counter() - t_start, 3),
        })

    # ------------------------------------------------------------------ saving
    def _write_config(self):
        if not self.is_main:
            return
        resolved = self.config.to_dict()
        resolved["resolved"] = {
            "input_layers": self.input_layers,
            "stage_steps": {str(k): v for k, v in self.stage_steps.items()},
            "world_size": self.world,
            "mixed_precision": self.accelerator.mixed_precision,
            "distributed_type": str(self.accelerator.distributed_type),
            "data": self.data_stats,
        }
        (self.output_dir / CONFIG_FILE).write_text(json.dumps(resolved, indent=2, default=str) + "\n")

    def _save_drafter(self, folder: Path, index: int | None, stage: StageConfig | None) -> Path:
        acc = self.accelerator
        acc.wait_for_everyone()
        drafter = acc.unwrap_model(self.model).drafter
        if self.is_main:
            info = {"training": {"recipe": self.config.recipe, "stage": index,
                                 "stage_name": stage.name if stage else "final",
                                 "target": self.config.target}}
            export_drafter(drafter, self.config, self.target, folder, info)
            for name in (CONFIG_FILE, LOG_FILE):
                src = self.output_dir / name
                if src.exists():
                    shutil.copyfile(src, folder / name)
        acc.wait_for_everyone()
        return folder


def train(config: TrainConfig, resume: bool | str | os.PathLike | None = None, quiet: bool = False,
          overwrite: bool = False) -> Path:
    """Run every enabled stage of ``config``; returns the final drafter folder.

    ``resume``: True (or "auto") continues from ``output_dir/checkpoints/latest`` when there is
    one (else starts fresh); a path continues from that checkpoint. Without ``resume``, an
    ``output_dir`` that already holds checkpoints is an error unless ``overwrite`` is set, which
    starts over and deletes the old checkpoints and log.
    """
    return Trainer(config, resume=resume, quiet=quiet, overwrite=overwrite).run()


def capture_only(config: TrainConfig, quiet: bool = False) -> Path:
    """Capture (or verify) the offline feature cache for ``config``'s data, then stop."""
    if not config.data.feature_cache:
        raise ConfigError("capturing features needs data.feature_cache")
    Trainer(config, quiet=quiet).setup()  # setup captures the train and held-out features
    return Path(config.data.feature_cache)
