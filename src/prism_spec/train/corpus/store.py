"""A corpus folder's format: the manifest and decoding settings, atomic file writes, token ids
packed into flat arrays, and the shard files (which prompts a shard holds, whether it is done,
the journal of an unfinished one)."""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
import warnings
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

FORMAT = "prism-spec-corpus/1"
MANIFEST = "corpus.json"
PROMPTS = "prompts.npz"
FINISH_CODES = {"stop": 0, "length": 1}
FINISH_NAMES = {v: k for k, v in FINISH_CODES.items()}


class CorpusError(ValueError):
    """The corpus folder or the settings given for it are not usable (a clear message says why)."""


@dataclasses.dataclass(frozen=True)
class DecodingSettings:
    """How the replies are decoded; fixed for a corpus (a resume with others is refused)."""

    max_new_tokens: int = 384
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise CorpusError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise CorpusError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise CorpusError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise CorpusError(f"top_k must be >= 0, got {self.top_k}")


def _atomic_write_bytes(path: Path, write: Callable[[Path], None]) -> None:
    """Run ``write(tmp)`` on a temporary file beside ``path``, then rename it into place."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes it private; these are shared data files
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: Path, data: dict) -> None:
    _atomic_write_bytes(path, lambda tmp: tmp.write_text(json.dumps(data, indent=1, ensure_ascii=False) + "\n"))


def write_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            np.savez_compressed(f, **arrays)

    _atomic_write_bytes(path, write)


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


def pack(seqs: Sequence[Sequence[int]], dtype: np.dtype) -> tuple[np.ndarray, np.ndarray]:
    offsets = np.zeros(len(seqs) + 1, dtype=np.int64)
    offsets[1:] = np.cumsum([len(s) for s in seqs])
    flat = np.fromiter((t for s in seqs for t in s), dtype=dtype, count=int(offsets[-1]))
    return flat, offsets


def unpack(flat: np.ndarray, offsets: np.ndarray) -> list[list[int]]:
    return [flat[offsets[i]:offsets[i + 1]].astype(np.int64).tolist() for i in range(len(offsets) - 1)]


def shard_name(k: int) -> str:
    return f"shard-{k:05d}"


def read_manifest(folder: str | os.PathLike) -> dict:
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise CorpusError(f"{folder} is not a corpus folder (no {MANIFEST})")
    try:
        manifest = json.loads(path.read_text())
    except ValueError as err:
        raise CorpusError(f"{path} is not valid JSON: {err}") from None
    if manifest.get("format") != FORMAT:
        raise CorpusError(f"{path}: unknown format {manifest.get('format')!r} (expected {FORMAT!r})")
    return manifest


def is_corpus(path: str | os.PathLike) -> bool:
    return (Path(path) / MANIFEST).is_file()


@dataclasses.dataclass
class Shard:
    index: int
    start: int  # first prompt index
    stop: int  # one past the last


def shards_of(manifest: dict) -> list[Shard]:
    n, size = manifest["prompts"]["count"], manifest["shard_size"]
    return [Shard(k, k * size, min(n, (k + 1) * size)) for k in range(manifest["num_shards"])]


def shard_done(folder: Path, k: int) -> bool:
    return (folder / f"{shard_name(k)}.json").is_file() and (folder / f"{shard_name(k)}.npz").is_file()


def read_partial(path: Path) -> dict[int, tuple[list[int], str]]:
    """Replies already in a shard's journal; a partial last line (a crash mid-write) is cut."""
    if not path.exists():
        return {}
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1
    if end < len(data):
        with open(path, "r+b") as f:
            f.truncate(end)
        data = data[:end]
    done: dict[int, tuple[list[int], str]] = {}
    for line in data.split(b"\n"):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            done[int(rec["i"])] = ([int(t) for t in rec["ids"]], str(rec["finish"]))
        except (ValueError, KeyError, TypeError):
            warnings.warn(f"{path}: an unreadable line was ignored; that reply is redone", stacklevel=2)
    return done
