"""Shared by the benchmark scripts (run as ``python benchmarks/<name>.py``, which puts this
folder on ``sys.path``)."""

from __future__ import annotations

import datetime
import json
import os
import platform
from pathlib import Path

import torch

from prism_spec.bench.machine import cpu_name


def write_rows(path: str | None, settings: dict, rows: list[dict]) -> None:
    """The rows of a benchmark's table as JSON, with its settings and the machine it ran on."""
    if not path:
        return
    meta = {"settings": settings, "cpu": cpu_name(), "torch": torch.__version__,
            "python": platform.python_version(), "date": str(datetime.date.today())}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(f"{path}.tmp")
    tmp.write_text(json.dumps({**meta, "rows": rows}, indent=1))
    os.replace(tmp, path)  # whole files only, also for scripts that rewrite it as rows finish
    print(f"\nwrote {path}")
