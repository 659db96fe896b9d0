"""What the training loop runs through accelerate: the ``Accelerator`` a config asks for, the
module it wraps (:class:`LossModule`: the drafter and its objective), a held-out evaluation pass
through that module, the learning-rate schedule, and the progress bars."""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os

import torch
from torch import nn

from .config import StageConfig, TrainConfig
from .errors import ConfigError
from .metrics import aggregate_metrics, metric_floats
from .objectives import ObjectiveConfig, compute_loss


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
        #: False on training steps whose metrics are not logged: compute_loss then skips the
        #: accuracy (and the target's full-vocabulary logits it needs).
        self.accuracy = True

    def forward(self, batch: dict):
        return compute_loss(self.drafter, batch, self.objective, self.generator, accuracy=self.accuracy)


@torch.no_grad()
def evaluate_heldout(model: nn.Module, source, stage: StageConfig, accelerator) -> dict[str, float]:
    """Mean metrics of ``model`` (the prepared :class:`LossModule`) over every example of
    ``source`` (a BatchSource) under ``stage``'s objective without input noise, averaged over
    the processes (each runs the same number of forwards); the model is left in train mode."""
    acc = accelerator
    rank, world = acc.process_index, acc.num_processes
    unwrapped = acc.unwrap_model(model)
    objective = dataclasses.replace(ObjectiveConfig.for_stage(stage), noise_std=0.0)
    saved = unwrapped.objective, unwrapped.generator, unwrapped.accuracy
    unwrapped.objective, unwrapped.generator, unwrapped.accuracy = objective, None, True
    model.eval()
    n = len(source)
    bs = stage.batch_size
    batches = [list(range(i, min(i + bs, n))) for i in range(0, n, bs)]
    per_rank = math.ceil(len(batches) / world)
    sums: dict[str, float] = {}
    try:
        for j in range(per_rank):  # every rank runs the same number of forwards
            idx = batches[(rank + j * world) % len(batches)]
            loss, metrics = model(source.batch(idx))
            m = metric_floats(metrics)
            m.setdefault("loss", float(loss.detach().float()))
            for k, v in m.items():
                sums[k] = sums.get(k, 0.0) + v
    finally:
        model.train()
        unwrapped.objective, unwrapped.generator, unwrapped.accuracy = saved
    return aggregate_metrics(sums, per_rank, acc)


def make_accelerator(config: TrainConfig):
    """The ``Accelerator`` for ``config`` (its mixed precision; DDP that tolerates unused modules)."""
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


def linear_schedule(optimizer, warmup: int, total: int, start: int = 0, rewarm: int = 0):
    """Linear warm-up over ``warmup`` steps, then linear decay to 0 at ``total``. ``start``: the
    optimizer takes over at that step of the schedule (a continued stage). ``rewarm``: a fresh
    optimizer on trained weights ramps the factor up over that many of its own steps as well."""
    def factor(step: int) -> float:
        if warmup > 0 and step < warmup:
            return step / warmup
        return max(0.0, (total - step) / max(1, total - warmup))

    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda i: factor(start + i) * (min(1.0, (i + 1) / rewarm) if rewarm else 1.0))


@contextlib.contextmanager
def hf_progress_bars(enabled: bool):
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


def progress_bar(**kw):
    """A tqdm bar (tqdm is imported only when one is made)."""
    from tqdm.auto import tqdm

    return tqdm(**kw)
