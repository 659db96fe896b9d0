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
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import json
import math
import os
import random
import shutil
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from accelerate.utils import DistributedType
from torch import nn

from ..drafters.checkpoint import save_feature_drafter, save_standard_drafter
from ..drafters.feature import FeatureDrafterConfig, FeatureDrafterModel
from ..drafters.standard import StandardDrafter
from ..targets.default import DEFAULT_TARGET, default_target_path
from ..targets.hf import Target, default_feature_layers, parse_dtype
from .config import ConfigError, StageConfig, TrainConfig, stage_total_steps
from .objectives import ObjectiveConfig
from .vocab import build_draft_vocab

#: Test hook: ``PRISM_TRAIN_KILL_AFTER_CHECKPOINT=k`` SIGKILLs the process right after the
#: checkpoint of global optimizer step ``k`` is in place (simulates a crash / preemption).
KILL_ENV = "PRISM_TRAIN_KILL_AFTER_CHECKPOINT"
#: Test / debugging hook: when set, every rank writes ``output_dir/digest-rank<r>.txt`` holding
#: the sha256 of its own final drafter state dict (data-parallel ranks must agree bitwise).
DIGEST_ENV = "PRISM_TRAIN_RANK_DIGEST"

CHECKPOINTS = "checkpoints"
LATEST = "latest"
STATE_FILE = "trainer_state.json"
LOG_FILE = "train_log.jsonl"
CONFIG_FILE = "train_config.json"


class TrainingError(RuntimeError):
    """Training cannot start or go on (empty data, incompatible checkpoint, ...)."""


# =========================================================================== data
@dataclasses.dataclass
class Example:
    input_ids: torch.Tensor  # [T] long
    loss_mask: torch.Tensor  # [T] bool/long


def _as_long(x) -> torch.Tensor:
    return x.detach().long().flatten() if isinstance(x, torch.Tensor) else torch.tensor(list(x), dtype=torch.long)


def load_examples(config: TrainConfig, tokenizer) -> tuple[list[Example], list[Example], dict]:
    """Read, split, subset and tokenize the training data; returns (train, holdout, stats).

    The held-out split is taken first and ``fraction`` / ``max_examples`` then sample the
    training part (nested, seeded subsets), so data-scaling runs share one validation set.
    """
    from .chat import tokenize_conversation
    from .corpus import CorpusExample, is_corpus, read_corpus
    from .mix import load_training_mix, sample, split_heldout

    data = config.data
    paths = [str(p) for p in data.paths]
    corpora = [p for p in paths if is_corpus(p)]  # token-id corpora (prism corpus build)
    try:
        conversations, reader_stats = load_training_mix([p for p in paths if p not in corpora], dedupe=data.dedupe)
        corpus_examples = [ex for folder in corpora for ex in read_corpus(folder)]
    except (FileNotFoundError, ValueError) as e:
        raise ConfigError(f"cannot read the training data: {e}") from None
    stats = reader_stats.as_dict() if hasattr(reader_stats, "as_dict") else {"reader": str(reader_stats)}
    stats.pop("sources", None)
    if corpora:
        stats["corpus_replies"] = len(corpus_examples)
        if not corpus_examples and not conversations:
            raise TrainingError(f"the corpora {corpora} hold no finished shard yet (prism corpus status)")
    conversations = conversations + corpus_examples
    if not conversations:
        raise TrainingError(f"no conversation could be read from {list(data.paths)} ({reader_stats})")
    holdout = int(data.holdout) if data.holdout >= 1 else float(data.holdout)
    if 0 < data.holdout < 1 and len(conversations) >= 2 and round(len(conversations) * data.holdout) == 0:
        holdout = 1  # a tiny data set still gets a validation example
    if isinstance(holdout, int):
        holdout = min(holdout, len(conversations) - 1)
    train_convs, held_convs = split_heldout(conversations, holdout, seed=data.seed)
    if data.fraction < 1.0:
        train_convs = sample(train_convs, float(data.fraction), seed=data.seed)
    if data.max_examples is not None and len(train_convs) > data.max_examples:
        train_convs = sample(train_convs, int(data.max_examples), seed=data.seed)

    def tokenize(convs) -> tuple[list[Example], int]:
        out, dropped = [], 0
        for conv in convs:
            tok = conv if isinstance(conv, CorpusExample) else tokenize_conversation(tokenizer, conv, data.max_length)
            ids, mask = _as_long(tok.input_ids[:data.max_length]), _as_long(tok.loss_mask[:data.max_length])
            # Usable: at least 3 tokens and an assistant token that some earlier token predicts.
            if ids.numel() < 3 or int(mask[2:].sum()) == 0:
                dropped += 1
                continue
            out.append(Example(ids, mask.bool()))
        return out, dropped

    train, dropped = tokenize(train_convs)
    held, dropped_held = tokenize(held_convs)
    if not train:
        hint = ""
        if stats.get("prompt_only"):
            hint = (f"; {stats['prompt_only']} conversations are prompt-only (no assistant reply): "
                    "generate replies with the target first (prism_spec.train.regenerate)")
        raise TrainingError(
            f"the training data is empty after filtering: {len(train_convs)} conversations from "
            f"{list(data.paths)}, none has an assistant token to train on within max_length={data.max_length}{hint}"
        )
    stats.update(
        {"train_conversations": len(train_convs), "holdout_conversations": len(held_convs),
         "dropped_no_target_tokens": dropped + dropped_held,
         "train_examples": len(train), "holdout_examples": len(held),
         "train_tokens": int(sum(e.input_ids.numel() for e in train)),
         "train_loss_tokens": int(sum(int(e.loss_mask.sum()) for e in train))}
    )
    return train, held, stats


class BatchSource:
    """Turns lists of example indices into model-ready batches (online or offline features)."""

    def __init__(self, examples: list[Example], target: Target, feature_layers, device, pad_id: int,
                 feature_dataset=None):
        self.examples = examples
        self.target = target
        self.feature_layers = feature_layers
        self.device = device
        self.pad_id = pad_id
        self.features = feature_dataset  # offline: indexable like ``examples``

    def __len__(self):
        return len(self.examples)

    def batch(self, indices: Sequence[int]) -> dict[str, torch.Tensor]:
        if self.features is not None:
            from .batching import collate

            items = [self.features[i] for i in indices]
            batch = collate(items, pad_token_id=self.pad_id)
            return {k: (v.to(self.device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}
        batch = _collate_tokens([self.examples[i] for i in indices], self.pad_id)
        batch = {k: (v.to(self.device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}
        from .features import capture_batch

        with torch.no_grad():
            feats = capture_batch(self.target, batch["input_ids"], batch["attention_mask"], self.feature_layers)
        for key, value in feats.items():
            if isinstance(value, torch.Tensor):
                # Inference-mode tensors cannot be saved for backward: give autograd a plain copy.
                batch[key] = value.clone() if value.is_inference() else value
            elif value is not None:
                batch[key] = value
        return batch


def _collate_tokens(examples: Sequence[Example], pad_id: int) -> dict[str, torch.Tensor]:
    from .batching import collate

    return collate([{"input_ids": e.input_ids, "loss_mask": e.loss_mask.long()} for e in examples],
                   pad_token_id=pad_id)


class DataOrder:
    """Which example each (stage, step, micro-batch, rank) reads: a pure function of the seed.

    With ``lengths`` (group by length), each epoch's shuffled order is cut into windows of
    ``GROUP_WINDOW`` micro-batches, each window sorted by length and cut into micro-batches,
    and the micro-batches shuffled: a batch holds examples of similar length, so little of it
    is padding, while every example is still seen once per epoch in a random batch order."""

    GROUP_WINDOW = 64

    def __init__(self, num_examples: int, seed: int, stage_index: int, batch_size: int, grad_accum: int,
                 world_size: int, rank: int, lengths: Sequence[int] | None = None):
        self.n, self.seed, self.stage = num_examples, seed, stage_index
        self.b, self.a, self.w, self.r = batch_size, grad_accum, world_size, rank
        if lengths is not None and len(lengths) != num_examples:
            raise ValueError(f"{len(lengths)} lengths for {num_examples} examples")
        self.lengths = list(lengths) if lengths is not None else None
        self._perms: dict[int, list[int]] = {}

    def permutation(self, epoch: int) -> list[int]:
        if epoch not in self._perms:
            if len(self._perms) > 4:
                self._perms.clear()
            g = torch.Generator().manual_seed(_mix_seed(self.seed, 7919 * (self.stage + 1), epoch))
            perm = torch.randperm(self.n, generator=g).tolist()
            if self.lengths is not None:
                window = self.b * self.GROUP_WINDOW
                blocks = []
                for start in range(0, self.n, window):
                    chunk = sorted(perm[start:start + window], key=lambda i: -self.lengths[i])
                    blocks += [chunk[k:k + self.b] for k in range(0, len(chunk), self.b)]
                order = torch.randperm(len(blocks), generator=g).tolist()
                perm = [i for k in order for i in blocks[k]]
            self._perms[epoch] = perm
        return self._perms[epoch]

    def indices(self, step: int, micro: int) -> list[int]:
        global_batch = self.b * self.a * self.w
        start = step * global_batch + (micro * self.w + self.r) * self.b
        out = []
        for k in range(start, start + self.b):
            epoch, pos = divmod(k, self.n)
            out.append(self.permutation(epoch)[pos])
        return out

    def epoch_at(self, step: int) -> float:
        return step * self.b * self.a * self.w / self.n


def _mix_seed(*parts: int) -> int:
    h = hashlib.sha256(":".join(str(int(p)) for p in parts).encode()).digest()
    return int.from_bytes(h[:8], "little") & ((1 << 63) - 1)


# =========================================================================== model
class LossModule(nn.Module):
    """Wraps the trainable drafter so that DDP / FSDP / DeepSpeed see one ``forward``.

    ``forward(batch)`` runs the stage's objective and returns (loss, metrics); the objective
    config and noise generator are set per stage on the unwrapped module.
    """

    def __init__(self, drafter: nn.Module):
        super().__init__()
        self.drafter = drafter
        self.objective = None
        self.generator: torch.Generator | None = None

    def forward(self, batch: dict):
        from .objectives import compute_loss

        return compute_loss(self.drafter, batch, self.objective, self.generator)


def _metric_floats(metrics: dict) -> dict[str, float]:
    out = {}
    for k, v in (metrics or {}).items():
        if isinstance(v, torch.Tensor) and v.numel() == 1:
            out[k] = float(v.detach().float())
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            out[k] = float(v)
    return out


def _aggregate(sums: dict[str, float], count: float, accelerator=None) -> dict[str, float]:
    """Means of summed metrics over ``count`` batches (and over processes when given an
    accelerator with several); ``acc_step{j}`` is recomputed token-weighted from
    ``correct_step{j}`` / ``count_step{j}`` when the objective reports those."""
    keys = sorted(sums)
    vec = torch.tensor([sums[k] for k in keys] + [float(count)], dtype=torch.float64)
    if accelerator is not None and accelerator.num_processes > 1:
        vec = accelerator.reduce(vec.to(accelerator.device), "sum").cpu()
    n = max(float(vec[-1]), 1.0)
    total = dict(zip(keys, vec[:-1].tolist()))
    out = {k: v / n for k, v in total.items()}
    for k in keys:
        if k.startswith("acc_step"):
            j = k[len("acc_step"):]
            c = total.get(f"count_step{j}")
            if c:
                out[k] = total[f"correct_step{j}"] / c if f"correct_step{j}" in total else out[k]
    return out


def resolve_target_path(name: str) -> str:
    return str(default_target_path()) if name == DEFAULT_TARGET else name


def resolve_input_layers(config: TrainConfig, num_layers: int) -> list[int] | None:
    spec = config.drafter.input_layers
    if spec == "none":
        return None
    layers = list(default_feature_layers(num_layers)) if spec == "auto" else list(spec)
    bad = [i for i in layers if not 0 <= i <= num_layers]
    if bad:
        raise ConfigError(
            f"drafter.input_layers {layers}: the target has {num_layers} layers, so HF hidden_states "
            f"indices run 0..{num_layers}"
        )
    return layers


def build_drafter(
    config: TrainConfig, target: Target, input_layers: list[int] | None, d2t: torch.Tensor | None = None
) -> nn.Module:
    """A fresh trainable drafter for ``target`` (float32 master weights, train mode)."""
    d = config.drafter
    if d.trains_as == "standard":
        shallow = StandardDrafter.from_target_layers(target, d.standard_layers)
        # from_target_layers SHARES the target's tensors: train a deep copy, never the target.
        model = copy.deepcopy(shallow.lm.model)
        del shallow
    else:
        fcfg = FeatureDrafterConfig.for_target(
            target,
            architecture=d.architecture,
            num_modules=d.num_modules,
            layers_per_module=d.layers_per_module,
            step_mapping=d.resolved_step_mapping(),
            input_layers=input_layers,
            input_norm=bool(input_layers) and d.input_norm,
            draft_vocab_size=d.draft_vocab_size,
        )
        model = FeatureDrafterModel(fcfg, target, d2t=d2t)
    model = model.float()
    if d.trains_as == "standard":
        from .objectives import attach_target_head

        attach_target_head(model, target.lm_head)  # the distillation target, never trained
    for p in model.parameters():
        p.requires_grad_(True)
    return model.train()


def state_sha256(model_or_state: nn.Module | dict) -> str:
    """sha256 over a state dict (sorted names + dtype + shape + raw bytes): equal iff bitwise equal."""
    state = model_or_state.state_dict() if isinstance(model_or_state, nn.Module) else model_or_state
    h = hashlib.sha256()
    for k, v in sorted(state.items()):
        v = v.detach().cpu().contiguous()
        h.update(f"{k}|{v.dtype}|{tuple(v.shape)}|".encode())
        h.update(v.reshape(-1).view(torch.uint8).numpy().tobytes() if v.numel() else b"")
    return h.hexdigest()


# =========================================================================== checkpoints
def _rng_state(generator: torch.Generator | None) -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    if generator is not None:
        state["generator"] = generator.get_state()
    return state


def _set_rng_state(state: dict, generator: torch.Generator | None) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if generator is not None and "generator" in state:
        generator.set_state(state["generator"])


def find_latest_checkpoint(output_dir: str | Path) -> Path | None:
    root = Path(output_dir) / CHECKPOINTS
    latest = root / LATEST
    if latest.exists() and (latest / STATE_FILE).exists():
        return latest.resolve()
    done = sorted(p for p in root.glob("step-*") if (p / STATE_FILE).exists()) if root.is_dir() else []
    return done[-1] if done else None


def _resolve_resume(resume: bool | str | os.PathLike | None, output_dir: Path) -> Path | None:
    if resume in (None, False):
        return None
    if resume is True or resume == "auto":
        return find_latest_checkpoint(output_dir)
    path = Path(resume)
    if path.is_dir() and (path / STATE_FILE).exists():
        return path
    if path.is_dir():
        found = find_latest_checkpoint(path.parent if path.name == CHECKPOINTS else path)
        if found is not None:
            return found
    raise TrainingError(f"--resume {path}: not a training checkpoint (no {STATE_FILE} in it)")


# =========================================================================== helpers
def _make_accelerator(config: TrainConfig):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedDataParallelKwargs

    mp = config.mixed_precision
    state = AcceleratorState._shared_state
    if state and state.get("_mixed_precision", mp) != mp:
        if PartialState().num_processes > 1:
            raise ConfigError(
                f"mixed_precision {mp!r} differs from the one accelerate was launched with "
                f"({state.get('_mixed_precision')!r}); pass --mixed_precision {mp} to accelerate launch"
            )
        AcceleratorState._reset_state()  # a second run in the same (single) process
    # PRISM's warmup stage trains module 0 only: the other modules get no gradient there.
    ddp = DistributedDataParallelKwargs(find_unused_parameters=config.drafter.num_modules > 1)
    # torchrun / accelerate launch on a machine without GPUs: accelerate only forms a
    # (gloo) process group on CPU when told cpu=True.
    launched = int(os.environ.get("WORLD_SIZE", "1")) > 1 or int(os.environ.get("LOCAL_RANK", "-1")) != -1
    cpu = launched and not torch.cuda.is_available()
    return Accelerator(mixed_precision=mp, kwargs_handlers=[ddp], step_scheduler_with_optimizer=False, cpu=cpu)


def _linear_schedule(optimizer, warmup: int, total: int):
    def factor(step: int) -> float:
        if warmup > 0 and step < warmup:
            return step / warmup
        return max(0.0, (total - step) / max(1, total - warmup))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


@contextlib.contextmanager
def _hf_progress_bars(enabled: bool):
    """transformers' own bars ("Loading weights") follow --quiet too. Their switch is global,
    so it is put back afterwards."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    if not enabled:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled and not enabled:
            hf_logging.enable_progress_bar()


def _tqdm(**kw):
    from tqdm.auto import tqdm

    return tqdm(**kw)


def _stage_folder(output_dir: Path, index: int, stage: StageConfig) -> Path:
    safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in stage.name)
    return output_dir / "stages" / f"{index}-{safe}"


def _fingerprint(config_dict: dict) -> dict:
    """The parts of a config that must not change across a resume."""
    keep = {k: v for k, v in config_dict.items() if k not in ("output_dir", "log_every", "eval_every",
                                                               "checkpoint_every", "keep_checkpoints",
                                                               "time_limit_s")}
    return keep


def _diff(a, b, path="") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b)):
            out += _diff(a.get(k), b.get(k), f"{path}.{k}" if path else k)
        return out
    return [] if a == b else [f"{path}: {a!r} -> {b!r}"]


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
        self.accelerator = _make_accelerator(config)
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
        self.resume_from = _resolve_resume(resume, self.output_dir) if resume else None
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
        with _hf_progress_bars(self.is_main and not self.quiet):
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
        self._print(
            f"[train] data: {self.data_stats['train_examples']} training / {self.data_stats['holdout_examples']} "
            f"held-out examples, {self.data_stats['train_loss_tokens']} trained tokens "
            f"({time.perf_counter() - t0:.1f} s)"
        )
        skipped = self.data_stats.get("skipped") or {}
        if skipped:  # bad records never stop a run, so say how many there were
            reasons = ", ".join(f"{reason}={n}" for reason, n in skipped.items())
            self._print(f"[train] data: skipped {sum(skipped.values())} malformed record(s) of "
                        f"{self.data_stats.get('read', '?')} read ({reasons})")
        if self.data_stats.get("dropped_no_target_tokens"):
            self._print(f"[train] data: dropped {self.data_stats['dropped_no_target_tokens']} conversation(s) with "
                        f"no assistant token to train on within max_length={config.data.max_length}")
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
        init_state = self._init_state() if config.init_from and self.resume_from is None else None
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
            self._load_init(drafter, init_state)
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

    def _init_state(self) -> dict:
        """The ``init_from`` drafter's weights, after checking its shape against the config."""
        from ..drafters.checkpoint import CheckpointError, read_feature_drafter

        try:
            saved, state = read_feature_drafter(self.config.init_from)
        except (CheckpointError, OSError, ValueError) as e:
            raise ConfigError(f"init_from: {e}") from None
        d = self.config.drafter
        wanted = {"architecture": d.architecture, "num_modules": d.num_modules,
                  "layers_per_module": d.layers_per_module, "step_mapping": d.resolved_step_mapping(),
                  "input_layers": self.input_layers, "draft_vocab_size": d.draft_vocab_size,
                  "hidden_size": int(self.target.hidden_size), "vocab_size": int(self.target.vocab_size)}
        got = {k: getattr(saved, k) for k in wanted}
        wrong = {k: (got[k], v) for k, v in wanted.items() if got[k] != v}
        if wrong:
            detail = ", ".join(f"{k}: drafter {a!r} vs config {b!r}" for k, (a, b) in wrong.items())
            raise ConfigError(f"init_from {self.config.init_from} does not match this run's drafter ({detail})")
        self._print(f"[train] starting from the drafter in {self.config.init_from}")
        return state

    @staticmethod
    def _load_init(drafter: nn.Module, state: dict) -> None:
        with torch.no_grad():
            drafter.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()},
                                    strict=True)

    def _prepare_model(self):
        """Hand the drafter to accelerate (DDP / FSDP wrapping) -- after any checkpoint load,
        so resumed weights go into the plain module whatever the wrapper."""
        self.model = self.accelerator.prepare(self.loss_module)

    def _source(self, examples: list[Example], split: str) -> BatchSource:
        dataset = None
        if self.config.data.feature_cache:
            dataset = self._offline_features(examples, split)
        return BatchSource(examples, self.target, self.feature_layers, self.accelerator.device, self.pad_id, dataset)

    def _offline_features(self, examples: list[Example], split: str):
        """Capture the target's features into the cache (shards split over the processes;
        shards already there are reused), then read them lazily."""
        from . import features

        folder = Path(self.config.data.feature_cache) / split
        acc = self.accelerator
        try:
            features.capture_features(
                self.target, [{"input_ids": e.input_ids, "loss_mask": e.loss_mask} for e in examples], folder,
                feature_layers=self.feature_layers, dtype=parse_dtype(self.config.data.feature_dtype),
                shard_index=self.rank, num_shards=self.world, progress=self.is_main and not self.quiet,
            )
        except features.FeatureCacheMismatch as e:
            raise TrainingError(f"feature cache {folder}: {e}") from None
        acc.wait_for_everyone()
        return features.FeatureDataset(folder)

    # ------------------------------------------------------------------ checkpoints
    def _checkpoint(self, stage_index: int, stage_step: int, global_step: int, optimizer, scheduler, elapsed: float):
        acc = self.accelerator
        root = self.output_dir / CHECKPOINTS
        name = f"step-{global_step:08d}"
        tmp = root / f".tmp-{name}"
        if self.is_main:
            root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
        acc.wait_for_everyone()
        torch.save(_rng_state(self.generator), tmp / f"rng_state_{self.rank}.pt")
        if optimizer is not None:  # per rank: identical under DDP, this rank's shard under FSDP
            torch.save(optimizer.state_dict(), tmp / f"optimizer_{self.rank}.pt")
        state_dict = acc.get_state_dict(self.model)  # collective under FSDP / DeepSpeed
        if self.is_main:
            state_dict = {k.removeprefix("drafter."): v for k, v in state_dict.items()}
            torch.save(state_dict, tmp / "model.pt")
            if optimizer is not None:
                torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
            if acc.scaler is not None:
                torch.save(acc.scaler.state_dict(), tmp / "scaler.pt")
            log = self.output_dir / LOG_FILE
            state = {
                "stage_index": stage_index, "stage_step": stage_step, "global_step": global_step,
                "world_size": self.world, "elapsed": elapsed,
                "log_bytes": log.stat().st_size if log.exists() else 0,
                "config": _fingerprint(self.config.to_dict()),
            }
            (tmp / STATE_FILE).write_text(json.dumps(state, indent=2) + "\n")
        acc.wait_for_everyone()
        if self.is_main:
            for f in tmp.iterdir():  # durable before it becomes visible
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
            final = root / name
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            link_tmp = root / f".{LATEST}.tmp"
            if link_tmp.is_symlink() or link_tmp.exists():
                link_tmp.unlink()
            os.symlink(name, link_tmp)
            os.replace(link_tmp, root / LATEST)
            done = sorted(p for p in root.glob("step-*") if p.is_dir())
            for old in done[: -self.config.keep_checkpoints]:
                shutil.rmtree(old, ignore_errors=True)
        acc.wait_for_everyone()
        kill = os.environ.get(KILL_ENV)
        if kill and int(kill) == global_step:
            sys.stderr.flush()
            os.kill(os.getpid(), signal.SIGKILL)

    def _load_checkpoint(self, folder: Path) -> dict:
        state = json.loads((folder / STATE_FILE).read_text())
        if state["world_size"] != self.world:
            raise TrainingError(
                f"checkpoint {folder} was written by {state['world_size']} processes; resume it with the same "
                f"number (now {self.world}) so the data order and the result stay exact"
            )
        changed = _diff(state.get("config", {}), _fingerprint(self.config.to_dict()))
        if changed:
            self._print("[train] warning: the config differs from the checkpoint's: " + "; ".join(changed[:8]))
        weights = torch.load(folder / "model.pt", map_location="cpu", weights_only=True)
        self.loss_module.drafter.load_state_dict(weights)
        log = self.output_dir / LOG_FILE
        if self.is_main and log.exists() and log.stat().st_size > state["log_bytes"]:
            with open(log, "r+b") as f:  # drop lines written after the checkpoint
                f.truncate(state["log_bytes"])
        return state

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate(self, stage: StageConfig) -> dict[str, float]:
        if self.eval_source is None:
            return {}
        acc = self.accelerator
        unwrapped = acc.unwrap_model(self.model)
        objective = dataclasses.replace(ObjectiveConfig.for_stage(stage), noise_std=0.0)
        saved = unwrapped.objective, unwrapped.generator
        unwrapped.objective, unwrapped.generator = objective, None
        self.model.eval()
        n = len(self.eval_source)
        bs = stage.batch_size
        batches = [list(range(i, min(i + bs, n))) for i in range(0, n, bs)]
        per_rank = math.ceil(len(batches) / self.world)
        sums: dict[str, float] = {}
        try:
            for j in range(per_rank):  # every rank runs the same number of forwards
                idx = batches[(self.rank + j * self.world) % len(batches)]
                loss, metrics = self.model(self.eval_source.batch(idx))
                m = _metric_floats(metrics)
                m.setdefault("loss", float(loss.detach().float()))
                for k, v in m.items():
                    sums[k] = sums.get(k, 0.0) + v
        finally:
            self.model.train()
            unwrapped.objective, unwrapped.generator = saved
        return _aggregate(sums, per_rank, acc)

    # ------------------------------------------------------------------ training
    def _optimizer(self, stage: StageConfig, total: int):
        params = [p for p in self.model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=stage.lr, betas=tuple(stage.betas), weight_decay=stage.weight_decay)
        warmup = int(stage.warmup_ratio * total)
        scheduler = _linear_schedule(optimizer, warmup, total)
        return self.accelerator.prepare_optimizer(optimizer), scheduler

    def run(self) -> Path:
        """Train every enabled stage (resuming when asked); returns the final drafter's folder."""
        with _hf_progress_bars(self.is_main and not self.quiet):
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
        elif self.is_main:
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
        last_folder = None
        for index, stage in enumerate(config.stages):
            if not stage.enabled:
                continue
            if index < start_stage:
                last_folder = _stage_folder(self.output_dir, index, stage)
                continue
            resuming = resume_state is not None and index == start_stage
            global_step = self._run_stage(index, stage, start_step if resuming else 0, global_step, t_start,
                                          resume_state if resuming else None)
            last_folder = self._save_drafter(_stage_folder(self.output_dir, index, stage), index, stage)
            if self.stopped_at is not None:
                self._print(f"[train] time limit of {config.time_limit_s} s reached: stopped in stage {index} "
                            f"after step {self.stopped_at[1]}; later stages skipped")
                break
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
        optimizer, scheduler = self._optimizer(stage, total)
        if resume_state is not None:
            folder = self.resume_from
            rng = torch.load(folder / f"rng_state_{self.rank}.pt", map_location="cpu", weights_only=False)
            _set_rng_state(rng, self.generator)
            if start_step > 0:  # mid-stage: the optimizer and schedule go on where they were
                optimizer.load_state_dict(
                    torch.load(folder / f"optimizer_{self.rank}.pt", map_location="cpu", weights_only=True))
                scheduler.load_state_dict(torch.load(folder / "scheduler.pt", map_location="cpu", weights_only=False))
                if acc.scaler is not None and (folder / "scaler.pt").exists():
                    acc.scaler.load_state_dict(torch.load(folder / "scaler.pt", weights_only=False))
        if start_step == 0:  # each stage's noise stream starts from its own seed
            self.generator.manual_seed(_mix_seed(config.seed, index, self.rank))
        lengths = [int(e.input_ids.numel()) for e in self.train_source.examples] if config.data.group_by_length else None
        order = DataOrder(len(self.train_source), config.seed, index, stage.batch_size, stage.grad_accum,
                          self.world, self.rank, lengths)
        params = [p for p in self.model.parameters() if p.requires_grad]
        self._print(
            f"[train] stage {index} '{stage.name}' ({stage.objective}): {total} steps, lr {stage.lr}, "
            f"global batch {stage.batch_size * stage.grad_accum * self.world} "
            f"({self.world} process{'es' if self.world > 1 else ''})"
        )
        bar = _tqdm(total=total, initial=start_step, desc=f"stage {index} {stage.name}",
                    disable=not self.is_main or self.quiet, dynamic_ncols=True, leave=True)
        self.model.train()
        for step in range(start_step, total):
            sums: dict[str, float] = {}
            for micro in range(stage.grad_accum):
                batch = self.train_source.batch(order.indices(step, micro))
                sync = micro == stage.grad_accum - 1
                with contextlib.nullcontext() if sync else acc.no_sync(self.model):
                    loss, metrics = self.model(batch)
                    acc.backward(loss / stage.grad_accum)
                m = _metric_floats(metrics)
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
            done = step + 1
            if self.is_main:
                bar.set_postfix(loss=f"{sums['loss'] / stage.grad_accum:.4f}", lr=f"{lr:.2e}", refresh=False)
                bar.update(1)
            if done % config.log_every == 0 or done == total:
                values = _aggregate(sums, stage.grad_accum, acc)
                self._log({
                    "split": "train", "stage": index, "stage_name": stage.name, "step": done,
                    "global_step": global_step, "epoch": round(order.epoch_at(done), 4),
                    "loss": values.pop("loss"), "lr": lr, "metrics": values,
                    "elapsed": round(time.perf_counter() - t_start, 3),
                })
            if (config.eval_every and done % config.eval_every == 0) or done == total:
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
            if done < total and self._out_of_time():
                self._eval_and_log(index, stage, done, global_step, t_start)
                self.stopped_at = (index, done)
                break
        bar.close()
        return global_step

    def _out_of_time(self) -> bool:
        """Every process stops at the same step: rank 0's clock decides."""
        limit = self.config.time_limit_s
        if limit is None:
            return False
        flag = torch.tensor([float(time.perf_counter() - self._t_started > limit)], device=self.accelerator.device)
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
            if self.config.drafter.trains_as == "standard":
                head = drafter.__dict__.get("target_head")
                model = copy.deepcopy(drafter, memo={id(head): None} if head is not None else None).eval()
                model.__dict__.pop("target_head", None)
                if self.config.save_dtype:
                    model = model.to(parse_dtype(self.config.save_dtype))
                for p in model.parameters():
                    p.requires_grad_(False)
                save_standard_drafter(StandardDrafter(model, name=f"{self.config.target}-standard"), self.target, folder)
            else:
                save_feature_drafter(drafter, folder, dtype=self.config.save_dtype, extra=info)
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
