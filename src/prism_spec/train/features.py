"""Target feature capture for drafter training.

Offline: :func:`capture_features` runs the target over tokenized examples once and writes a
sharded cache; :class:`FeatureDataset` reads it back lazily. Online: :func:`capture_batch` runs
the target inside the training loop instead.

Features per token: ``hidden`` = the target's last hidden state after its final norm (what
EAGLE-style drafters consume and predict), and, when ``feature_layers`` is given, ``layers`` =
the concatenation of ``hidden_states[i]`` for ``i`` in ``feature_layers`` (HF indices: 0 is
the embedding output, ``i`` the output of decoder layer ``i``; see
:func:`prism_spec.targets.hf.default_feature_layers`), the EAGLE-3 / PRISM* input.

Cache layout (``out_dir``)::

    index.json                 target name, hidden size, dtype, feature_layers, example and
                               shard counts, and the per-shard entries below (merged)
    shard-00003.safetensors    examples [3*shard_size, 4*shard_size): concatenated
                               input_ids [N] int32, loss_mask [N] uint8, hidden [N, h],
                               layers [N, k*h] (optional), offsets [E+1] int64
    shard-00003.json           that shard's entry: sha256, bytes, counts, examples hash

Every file is written to a temporary name and moved into place with ``os.replace``, so a
crash leaves whole files only. A shard counts as done when its ``.json`` entry exists, the
file has the recorded size and the entry's examples hash matches the examples it should hold;
a rerun skips done shards. Process ``i`` of ``n`` handles shards ``i, i+n, i+2n, ...``; the
entries live in per-shard files so concurrent processes never write the same file (the
``index.json`` merge is rewritten by each process and rebuilt from the entries on read).
"""

from __future__ import annotations

import bisect
import hashlib
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any, Sequence

import torch

from ..targets.attention import attention_backends

FORMAT = "prism-spec-features/1"
INDEX = "index.json"
_DTYPE_NAMES = {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32"}
_NAME_DTYPES = {v: k for k, v in _DTYPE_NAMES.items()}
_ST_DTYPES = {"bfloat16": "BF16", "float16": "F16", "float32": "F32"}


class CorruptShardError(RuntimeError):
    """A cache shard is missing, truncated, or does not match its recorded checksum/shape."""


class FeatureCacheMismatch(ValueError):
    """``out_dir`` holds features of another target, dtype, layer set or example list."""


def shard_file(k: int) -> str:
    return f"shard-{k:05d}.safetensors"


def _entry_file(k: int) -> str:
    return f"shard-{k:05d}.json"


def example_ids_and_mask(example: Any) -> tuple[list[int], list[int]]:
    """(token ids, loss mask) as int lists of a TokenizedExample / train-loop Example (an
    object with ``input_ids`` and ``loss_mask``), a dict with those keys or a plain id list;
    no mask means every token. Refuses an empty example or a mask of another length."""
    if isinstance(example, dict):
        ids, mask = example["input_ids"], example.get("loss_mask")
    elif hasattr(example, "input_ids"):
        ids, mask = example.input_ids, getattr(example, "loss_mask", None)
    else:
        ids, mask = example, None
    ids = [int(t) for t in (ids.tolist() if torch.is_tensor(ids) else ids)]
    if mask is None:
        mask = [1] * len(ids)
    mask = [int(m) for m in (mask.tolist() if torch.is_tensor(mask) else mask)]
    if len(mask) != len(ids):
        raise ValueError("loss_mask and input_ids differ in length")
    if not ids:
        raise ValueError("an example has no tokens")
    return ids, mask


def _examples_hash(pairs: Sequence[tuple[list[int], list[int]]]) -> str:
    h = hashlib.sha256()
    for ids, mask in pairs:
        h.update(json.dumps([ids, mask], separators=(",", ":")).encode())
        h.update(b"\n")
    return h.hexdigest()


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _write_json_atomic(path: Path, data: dict) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1, sort_keys=True)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


# --------------------------------------------------------------------------- the target pass
@torch.no_grad()
def capture_batch(
    target,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    feature_layers: Sequence[int] | None = None,
) -> dict[str, torch.Tensor]:
    """Run the target (a plain causal forward, no cache) over a right-padded batch.

    Returns ``hidden`` [B, n, h] (last hidden state after the final norm) and, when
    ``feature_layers`` is given, ``layers`` [B, n, len(feature_layers) * h], in the target's
    dtype on its device. Padded positions hold garbage; mask them with ``attention_mask``.
    Runs under ``no_grad`` (not ``inference_mode``) so the outputs can feed a trained drafter."""
    if input_ids.dim() == 1:
        input_ids = input_ids[None]
    device = target.device
    if attention_mask is not None and bool(attention_mask.all()):
        attention_mask = None  # no padding: let attention take its plain causal path
    with attention_backends(device):  # padded batch lengths vary from batch to batch
        out = target.decoder(
            input_ids=input_ids.to(device),
            attention_mask=attention_mask.to(device) if attention_mask is not None else None,
            use_cache=False,
            output_hidden_states=bool(feature_layers),
        )
    result = {"hidden": out.last_hidden_state}
    if feature_layers:
        states = out.hidden_states
        for i in feature_layers:
            if not 0 <= i < len(states):
                raise ValueError(f"feature layer {i} out of range: the target has {len(states)} hidden states")
        result["layers"] = torch.cat([states[i] for i in feature_layers], dim=-1)
    return result


def _pad_right(seqs: Sequence[list[int]], pad: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    n = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), n), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), n), dtype=torch.long)
    for b, s in enumerate(seqs):
        ids[b, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[b, : len(s)] = 1
    return ids, mask


# --------------------------------------------------------------------------- offline capture
def _meta(target, dtype: torch.dtype, feature_layers, num_examples: int, shard_size: int) -> dict:
    return {
        "format": FORMAT,
        "target": str(target.name),
        "hidden_size": int(target.hidden_size),
        "dtype": _DTYPE_NAMES[dtype],
        "feature_layers": list(feature_layers) if feature_layers else None,
        "num_examples": num_examples,
        "shard_size": shard_size,
        "num_shards": math.ceil(num_examples / shard_size) if num_examples else 0,
    }


_META_KEYS = ("format", "target", "hidden_size", "dtype", "feature_layers", "num_examples", "shard_size", "num_shards")


def _shard_done(out_dir: Path, k: int, examples_hash: str) -> bool:
    entry = _read_json(out_dir / _entry_file(k))
    path = out_dir / shard_file(k)
    if entry is None or not path.exists() or path.stat().st_size != entry.get("bytes"):
        return False
    if entry.get("examples_sha256") != examples_hash:
        raise FeatureCacheMismatch(
            f"{path} holds features of other examples than those given for shard {k}; "
            "use a fresh out_dir for a new example list"
        )
    return True


def load_index(out_dir: str | os.PathLike) -> dict:
    """``index.json`` with its ``shards`` list rebuilt from the per-shard entry files."""
    out_dir = Path(out_dir)
    index = _read_json(out_dir / INDEX)
    if index is None:
        raise FileNotFoundError(f"no feature cache index at {out_dir / INDEX}")
    shards = []
    for k in range(index["num_shards"]):
        entry = _read_json(out_dir / _entry_file(k))
        if entry is not None:
            shards.append(entry)
    index["shards"] = shards
    index["complete"] = len(shards) == index["num_shards"]
    return index


def _write_index(out_dir: Path) -> dict:
    index = load_index(out_dir)
    _write_json_atomic(out_dir / INDEX, index)
    return index


def capture_features(
    target,
    examples: Sequence[Any],
    out_dir: str | os.PathLike,
    feature_layers: Sequence[int] | None = None,
    dtype: torch.dtype = torch.bfloat16,
    shard_index: int = 0,
    num_shards: int = 1,
    shard_size: int = 256,
    batch_size: int = 8,
    progress: bool = True,
) -> dict:
    """Capture target features for ``examples`` (TokenizedExample, dicts with ``input_ids`` /
    ``loss_mask``, or id lists) into ``out_dir``; see the module docstring for the layout.

    This process handles shards ``shard_index, shard_index + num_shards, ...`` and skips those
    already done. Within a shard, examples are batched ``batch_size`` at a time, shortest
    first, right-padded. Returns the merged index."""
    from tqdm.auto import tqdm

    if dtype not in _DTYPE_NAMES:
        raise ValueError(f"dtype must be one of {list(_DTYPE_NAMES)}")
    if not 0 <= shard_index < num_shards:
        raise ValueError(f"shard_index {shard_index} not in [0, {num_shards})")
    if shard_size < 1 or batch_size < 1:
        raise ValueError("shard_size and batch_size must be >= 1")
    feature_layers = tuple(int(i) for i in feature_layers) if feature_layers else None
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    meta = _meta(target, dtype, feature_layers, len(examples), shard_size)
    existing = _read_json(out_dir / INDEX)
    if existing is not None:
        diff = {k: (existing.get(k), meta[k]) for k in _META_KEYS if existing.get(k) != meta[k]}
        if diff:
            raise FeatureCacheMismatch(
                f"{out_dir} holds another feature cache (cache vs now: {diff}); use a fresh out_dir"
            )
    else:
        _write_json_atomic(out_dir / INDEX, {**meta, "shards": [], "complete": False})

    mine = list(range(shard_index, meta["num_shards"], num_shards))
    for k in tqdm(mine, desc=f"features {shard_index}/{num_shards}", disable=not progress):
        pairs = [example_ids_and_mask(ex) for ex in examples[k * shard_size : (k + 1) * shard_size]]
        ex_hash = _examples_hash(pairs)
        if _shard_done(out_dir, k, ex_hash):
            continue
        _capture_shard(target, pairs, out_dir, k, ex_hash, feature_layers, dtype, batch_size)
    return _write_index(out_dir)


def _capture_shard(target, pairs, out_dir: Path, k: int, ex_hash: str, feature_layers, dtype, batch_size) -> None:
    hidden: list[torch.Tensor | None] = [None] * len(pairs)
    layers: list[torch.Tensor | None] = [None] * len(pairs)
    order = sorted(range(len(pairs)), key=lambda i: len(pairs[i][0]))
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        ids, mask = _pad_right([pairs[i][0] for i in idx])
        feats = capture_batch(target, ids, mask, feature_layers)
        for b, i in enumerate(idx):
            n = len(pairs[i][0])
            hidden[i] = feats["hidden"][b, :n].to("cpu", dtype)
            if feature_layers:
                layers[i] = feats["layers"][b, :n].to("cpu", dtype)
    lengths = torch.tensor([len(p[0]) for p in pairs], dtype=torch.long)
    tensors = {
        "input_ids": torch.tensor([t for p in pairs for t in p[0]], dtype=torch.int32),
        "loss_mask": torch.tensor([m for p in pairs for m in p[1]], dtype=torch.uint8),
        "offsets": torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)]),
        "hidden": torch.cat(hidden).contiguous(),
    }
    if feature_layers:
        tensors["layers"] = torch.cat(layers).contiguous()
    from safetensors.torch import save_file

    path = out_dir / shard_file(k)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=out_dir)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata={"format": FORMAT, "shard": str(k), "examples_sha256": ex_hash})
        entry = {
            "shard": k,
            "file": path.name,
            "sha256": _sha256_file(Path(tmp)),
            "bytes": os.path.getsize(tmp),
            "num_examples": len(pairs),
            "num_tokens": int(lengths.sum()),
            "examples_sha256": ex_hash,
        }
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    _write_json_atomic(out_dir / _entry_file(k), entry)


# --------------------------------------------------------------------------- reading
class _Shard:
    """One opened, checked shard."""

    def __init__(self, path: Path, entry: dict, index: dict, verify: bool):
        from safetensors import SafetensorError, safe_open

        self.path = path
        if not path.exists():
            raise CorruptShardError(f"feature shard {path} is missing")
        size = path.stat().st_size
        if size != entry["bytes"]:
            raise CorruptShardError(f"feature shard {path} has {size} bytes, expected {entry['bytes']} (truncated or replaced)")
        if verify and _sha256_file(path) != entry["sha256"]:
            raise CorruptShardError(f"feature shard {path} fails its sha256 check (corrupt); delete it and rerun capture")
        try:
            self.handle = safe_open(str(path), framework="pt")
            keys = set(self.handle.keys())
            need = {"input_ids", "loss_mask", "offsets", "hidden"} | ({"layers"} if index["feature_layers"] else set())
            if not need <= keys:
                raise CorruptShardError(f"feature shard {path} lacks tensors {sorted(need - keys)}")
            self.offsets = self.handle.get_tensor("offsets").tolist()
            n, e, h = entry["num_tokens"], entry["num_examples"], index["hidden_size"]
            st_dtype = _ST_DTYPES[index["dtype"]]
            checks = {"input_ids": [n], "loss_mask": [n], "offsets": [e + 1], "hidden": [n, h]}
            if index["feature_layers"]:
                checks["layers"] = [n, len(index["feature_layers"]) * h]
            for key, shape in checks.items():
                got = list(self.handle.get_slice(key).get_shape())
                if got != shape:
                    raise CorruptShardError(f"feature shard {path}: {key} has shape {got}, expected {shape}")
            for key in ("hidden", "layers") if index["feature_layers"] else ("hidden",):
                got = self.handle.get_slice(key).get_dtype()
                if got != st_dtype:
                    raise CorruptShardError(f"feature shard {path}: {key} is {got}, expected {st_dtype}")
            if self.offsets[0] != 0 or self.offsets[-1] != n or any(
                b < a for a, b in zip(self.offsets, self.offsets[1:])
            ):
                raise CorruptShardError(f"feature shard {path}: bad offsets")
        except SafetensorError as exc:
            raise CorruptShardError(f"feature shard {path} is not a readable safetensors file: {exc}") from exc
        self.has_layers = bool(index["feature_layers"])

    def example(self, j: int) -> dict[str, torch.Tensor]:
        a, b = self.offsets[j], self.offsets[j + 1]
        item = {
            "input_ids": self.handle.get_slice("input_ids")[a:b].long(),
            "loss_mask": self.handle.get_slice("loss_mask")[a:b].long(),
            "hidden": self.handle.get_slice("hidden")[a:b],
        }
        if self.has_layers:
            item["layers"] = self.handle.get_slice("layers")[a:b]
        return item


class FeatureDataset(torch.utils.data.Dataset):
    """Examples of a feature cache, read lazily (memory-mapped slices of one example).

    Items: ``input_ids`` [n] long, ``loss_mask`` [n] long, ``hidden`` [n, h] and ``layers``
    [n, k*h] when cached (stored dtype, or ``feature_dtype``). ``verify`` checks each shard's
    sha256 the first time this process opens it (size, shapes and dtypes are always checked);
    a bad shard raises :class:`CorruptShardError` naming the file. Missing shards raise unless
    ``allow_missing``, which serves the shards present."""

    def __init__(
        self,
        out_dir: str | os.PathLike,
        verify: bool = True,
        allow_missing: bool = False,
        feature_dtype: torch.dtype | None = None,
    ):
        self.out_dir = Path(out_dir)
        self.index = load_index(self.out_dir)
        if self.index.get("format") != FORMAT:
            raise FeatureCacheMismatch(f"{self.out_dir / INDEX} is not a {FORMAT} index")
        if not self.index["complete"] and not allow_missing:
            have = {e["shard"] for e in self.index["shards"]}
            missing = [k for k in range(self.index["num_shards"]) if k not in have]
            raise FileNotFoundError(
                f"feature cache {self.out_dir} is incomplete: shards {missing} missing "
                "(run capture_features for them, or pass allow_missing=True)"
            )
        self.entries = sorted(self.index["shards"], key=lambda e: e["shard"])
        self.verify = verify
        self.feature_dtype = feature_dtype
        self.feature_layers = tuple(self.index["feature_layers"]) if self.index["feature_layers"] else None
        self.hidden_size = int(self.index["hidden_size"])
        self._starts = []
        total = 0
        for e in self.entries:
            self._starts.append(total)
            total += e["num_examples"]
        self._len = total
        self._open: dict[int, _Shard] = {}
        self._pid = os.getpid()

    def __len__(self) -> int:
        return self._len

    def _shard(self, s: int) -> _Shard:
        if os.getpid() != self._pid:  # a DataLoader worker: reopen files in this process
            self._open, self._pid = {}, os.getpid()
        shard = self._open.get(s)
        if shard is None:
            entry = self.entries[s]
            shard = _Shard(self.out_dir / entry["file"], entry, self.index, self.verify)
            self._open[s] = shard
        return shard

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        if i < 0:
            i += self._len
        if not 0 <= i < self._len:
            raise IndexError(i)
        s = bisect.bisect_right(self._starts, i) - 1
        item = self._shard(s).example(i - self._starts[s])
        if self.feature_dtype is not None:
            for key in ("hidden", "layers"):
                if key in item:
                    item[key] = item[key].to(self.feature_dtype)
        return item

    def lengths(self) -> list[int]:
        """Token count of every example (reads only the offsets), for length bucketing."""
        out = []
        for s in range(len(self.entries)):
            off = self._shard(s).offsets
            out += [b - a for a, b in zip(off, off[1:])]
        return out


def verify_features(out_dir: str | os.PathLike) -> dict:
    """Check every shard of a cache (sha256, size, shapes, dtypes); raises on the first bad
    one, else returns the index."""
    ds = FeatureDataset(out_dir, verify=True)
    for s in range(len(ds.entries)):
        ds._shard(s)
    return ds.index
