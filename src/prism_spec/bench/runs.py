"""The runs file a bench appends to and a report reads: one JSON record per run in
``runs.jsonl``, the settings and machine in ``bench.json`` next to it.

Shared by :mod:`.runner` (which writes them) and :mod:`.report` (which reads them).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import IO

RUNS_FILE = "runs.jsonl"
META_FILE = "bench.json"


class BenchError(RuntimeError):
    """A bench that cannot start or resume as asked."""


def temperature_tag(t: float) -> str:
    """A temperature as run keys and reports spell it: ``T=0``, ``T=0.7``."""
    return f"T={float(t):g}"


def read_runs(path: str | os.PathLike, repair: bool = False) -> list[dict]:
    """Records of a runs file. A last line cut short by a crash (no newline, or not JSON) is
    ignored; with ``repair`` it is also cut from the file so appends start on a clean line.
    A bad line anywhere else is an error."""
    path = Path(path)
    if not path.exists():
        return []
    data = path.read_bytes()
    records: list[dict] = []
    pos = good = 0  # good: bytes up to the end of the last complete record line
    missing_newline = False
    while pos < len(data):
        nl = data.find(b"\n", pos)
        line = data[pos:] if nl == -1 else data[pos:nl]
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                if nl != -1 and data[nl + 1 :].strip():
                    raise BenchError(f"{path}: a line in the middle of the file is not valid JSON") from None
                break  # the truncated last line of an interrupted bench
        if nl == -1:  # a complete record without its newline
            good, missing_newline = len(data), bool(line.strip())
            break
        pos = good = nl + 1
    if repair and (good != len(data) or missing_newline):
        with open(path, "r+b") as f:
            f.truncate(good)
            if missing_newline:
                f.seek(good)
                f.write(b"\n")
    return records


def append_run(f: IO[str], record: dict) -> None:
    """Append one record to an open runs file as one JSON line, on disk before it returns (a
    crash loses at most the run in progress)."""
    f.write(json.dumps(record, separators=(",", ":")) + "\n")
    f.flush()
    os.fsync(f.fileno())


def finished_runs(runs) -> list[dict]:
    """The runs that finished without an error."""
    return [r for r in runs if not r.get("error")]


def method_order(runs) -> list[str]:
    """Method names in first-seen order, vanilla first."""
    seen = list(dict.fromkeys(r["method"] for r in runs))
    return (["vanilla"] if "vanilla" in seen else []) + [m for m in seen if m != "vanilla"]


def temperatures(runs) -> list[float]:
    """The temperatures the runs used, ascending."""
    return sorted({float(r["temperature"]) for r in runs})

