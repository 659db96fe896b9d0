"""Training metrics: the per-batch values an objective reports, summed over micro-batches and
averaged over batches and processes."""

from __future__ import annotations

import torch


def metric_floats(metrics: dict) -> dict[str, float]:
    """The scalar metrics of one batch as floats (one-element tensors and numbers; the rest is dropped)."""
    out = {}
    for k, v in (metrics or {}).items():
        if isinstance(v, torch.Tensor) and v.numel() == 1:
            out[k] = float(v.detach().float())
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            out[k] = float(v)
    return out


def aggregate_metrics(sums: dict[str, float], count: float, accelerator=None) -> dict[str, float]:
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
