"""The machine a bench runs on, recorded with its results (and by the benchmark scripts and the
corpus shards)."""

from __future__ import annotations

import datetime as _dt
import os
import platform
from pathlib import Path

import torch


def cpu_name() -> str:
    """The CPU's model name (from /proc/cpuinfo on Linux), else what :mod:`platform` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_description() -> str:
    """The GPU's name, else the CPU model and core count: where a corpus shard was produced."""
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)} (CUDA)"
    return f"{cpu_name()}, {os.cpu_count()} logical cores"


def machine_info(device: str | torch.device = "cpu") -> dict:
    """The machine a bench runs on (``bench.json``'s ``machine``): platform, CPU, threads,
    the GPU behind ``device``, library versions and the date."""
    import transformers

    from .. import __version__

    device = torch.device(device)
    gpu = None
    if device.type == "cuda" and torch.cuda.is_available():
        gpu = torch.cuda.get_device_name(device)
    return {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "gpu": gpu,
        "device": str(device),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "prism_spec": __version__,
        "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
    }
