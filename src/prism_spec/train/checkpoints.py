"""Training checkpoints: what a run needs to go on exactly where it stopped.

``output_dir/checkpoints/step-<global step>/`` holds the drafter's weights (``model.pt``), every
rank's RNG states (``rng_state_<rank>.pt``: python, numpy, torch, CUDA and the objective's noise
generator) and optimizer state (``optimizer_<rank>.pt``), the scheduler (and fp16 scaler), and
``trainer_state.json`` (stage index, step inside it, global step, world size, elapsed time, the
log's length then, and the config's fingerprint). It is written to a temporary folder and moved
into place with one ``os.replace``; ``checkpoints/latest`` links to the newest.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .config import resolve_aliases
from .errors import TrainingError

CHECKPOINTS = "checkpoints"
LATEST = "latest"
STATE_FILE = "trainer_state.json"


def state_sha256(model_or_state: nn.Module | dict) -> str:
    """sha256 over a state dict (sorted names + dtype + shape + raw bytes): equal iff bitwise equal."""
    state = model_or_state.state_dict() if isinstance(model_or_state, nn.Module) else model_or_state
    h = hashlib.sha256()
    for k, v in sorted(state.items()):
        v = v.detach().cpu().contiguous()
        h.update(f"{k}|{v.dtype}|{tuple(v.shape)}|".encode())
        h.update(v.reshape(-1).view(torch.uint8).numpy().tobytes() if v.numel() else b"")
    return h.hexdigest()


# --------------------------------------------------------------------------- RNG state
def rng_state(generator: torch.Generator | None) -> dict:
    """This process's RNG states (python, numpy, torch, CUDA) and ``generator``'s."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    if generator is not None:
        state["generator"] = generator.get_state()
    return state


def set_rng_state(state: dict, generator: torch.Generator | None) -> None:
    """Put back what :func:`rng_state` returned."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if generator is not None and "generator" in state:
        generator.set_state(state["generator"])


# --------------------------------------------------------------------------- writing
def save_checkpoint(accelerator, model: nn.Module, generator: torch.Generator | None, root: Path, global_step: int,
                    state: dict | None, optimizer=None, scheduler=None, keep: int = 2) -> Path:
    """Write checkpoint ``root/step-<global_step>``; every process calls it (collective).

    ``model`` is the accelerate-prepared module holding the drafter as ``drafter``; ``state`` is
    what ``trainer_state.json`` holds (the main process's; the others may pass None). Without an
    ``optimizer`` (a stage boundary) no optimizer or scheduler state is kept. The newest ``keep``
    checkpoints are kept, older ones deleted."""
    acc = accelerator
    rank, is_main = acc.process_index, acc.is_main_process
    name = f"step-{global_step:08d}"
    tmp = root / f".tmp-{name}"
    if is_main:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    acc.wait_for_everyone()
    torch.save(rng_state(generator), tmp / f"rng_state_{rank}.pt")
    if optimizer is not None:  # per rank: identical under DDP, this rank's shard under FSDP
        torch.save(optimizer.state_dict(), tmp / f"optimizer_{rank}.pt")
    state_dict = acc.get_state_dict(model)  # collective under FSDP / DeepSpeed
    if is_main:
        state_dict = {k.removeprefix("drafter."): v for k, v in state_dict.items()}
        torch.save(state_dict, tmp / "model.pt")
        if optimizer is not None:
            torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        if acc.scaler is not None:
            torch.save(acc.scaler.state_dict(), tmp / "scaler.pt")
        (tmp / STATE_FILE).write_text(json.dumps(state, indent=2) + "\n")
    acc.wait_for_everyone()
    final = root / name
    if is_main:
        for f in tmp.iterdir():  # durable before it becomes visible
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        link_tmp = root / f".{LATEST}.tmp"
        if link_tmp.is_symlink() or link_tmp.exists():
            link_tmp.unlink()
        os.symlink(name, link_tmp)
        os.replace(link_tmp, root / LATEST)
        done = sorted(p for p in root.glob("step-*") if p.is_dir())
        for old in done[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    acc.wait_for_everyone()
    return final


# --------------------------------------------------------------------------- reading
def find_latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The newest complete checkpoint of the run in ``output_dir``, or None."""
    root = Path(output_dir) / CHECKPOINTS
    latest = root / LATEST
    if latest.exists() and (latest / STATE_FILE).exists():
        return latest.resolve()
    done = sorted(p for p in root.glob("step-*") if (p / STATE_FILE).exists()) if root.is_dir() else []
    return done[-1] if done else None


def resolve_resume(resume: bool | str | os.PathLike | None, output_dir: Path) -> Path | None:
    """The checkpoint that ``resume`` (True / "auto": the latest in ``output_dir``; a checkpoint,
    checkpoints or run folder) names; None for no resume or no checkpoint yet."""
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


def read_checkpoint(folder: Path, world_size: int) -> dict:
    """The ``trainer_state.json`` of checkpoint ``folder``; refused (TrainingError) when another
    number of processes wrote it, since the data order and the result would not be exact."""
    state = json.loads((folder / STATE_FILE).read_text())
    if state["world_size"] != world_size:
        raise TrainingError(
            f"checkpoint {folder} was written by {state['world_size']} processes; resume it with the same "
            f"number (now {world_size}) so the data order and the result stay exact"
        )
    return state


def load_model_state(folder: Path) -> dict:
    """The drafter's state dict in checkpoint ``folder`` (on the CPU)."""
    return torch.load(folder / "model.pt", map_location="cpu", weights_only=True)


def restore_training_state(folder: Path, rank: int, generator: torch.Generator | None, optimizer=None,
                           scheduler=None, scaler=None) -> None:
    """Put back this rank's RNG states from checkpoint ``folder`` and, when given an
    ``optimizer`` (a checkpoint in the middle of a stage), the optimizer, the scheduler and the
    ``scaler`` (when the checkpoint has one)."""
    rng = torch.load(folder / f"rng_state_{rank}.pt", map_location="cpu", weights_only=False)
    set_rng_state(rng, generator)
    if optimizer is not None:
        optimizer.load_state_dict(torch.load(folder / f"optimizer_{rank}.pt", map_location="cpu", weights_only=True))
        scheduler.load_state_dict(torch.load(folder / "scheduler.pt", map_location="cpu", weights_only=False))
        if scaler is not None and (folder / "scaler.pt").exists():
            scaler.load_state_dict(torch.load(folder / "scaler.pt", weights_only=False))


# --------------------------------------------------------------------------- config fingerprint
def config_fingerprint(config_dict: dict) -> dict:
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


def config_changes(state: dict, config_dict: dict) -> list[str]:
    """The settings (``path: old -> new``) in which ``config_dict`` differs from the config that
    wrote checkpoint ``state``, leaving out those a resume may change; old objective names in the
    checkpoint are read as the current ones (config.OBJECTIVE_ALIASES)."""
    return _diff(resolve_aliases(state.get("config", {})), config_fingerprint(config_dict))
