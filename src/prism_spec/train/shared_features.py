"""Target features handed from one training run to a later one on the same machine."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from .features import FORMAT


class SharedFeatures:
    """Online features of whole training batches, handed from one run to a later one on the
    same machine, so a batch that two runs both train on costs one target pass.

    A run in role ``"write"`` stores each batch's features under a key of everything that
    decides them (target, dtype, device kind, feature layers, the padded token ids and mask);
    a run in role ``"read"`` takes a batch's features from there when present (and deletes the
    file: each batch is read once) and runs the target otherwise. A campaign's EAGLE-2 and HASS
    segments of one level walk the same data order, so HASS reads what EAGLE-2 wrote. Role
    ``"reuse"`` is a plain cache: it reads and keeps a batch's file, and writes the ones it
    had to compute, for any number of runs over the same batches (the variants of an A/B
    study); whoever made the folder removes it. Writing
    stops quietly at ``max_bytes`` in the folder or when the disk keeps less than
    ``min_free_bytes``; reading never needs the file to be there. Files are written to a
    temporary name and moved into place, so a crash leaves whole files only.
    """

    ROLES = ("write", "read", "reuse")

    def __init__(self, folder: str | os.PathLike, role: str, target, feature_layers=None,
                 max_bytes: int = 16 << 30, min_free_bytes: int = 8 << 30):
        if role not in self.ROLES:
            raise ValueError(f"role must be one of {self.ROLES}, got {role!r}")
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.role = role
        self.max_bytes, self.min_free_bytes = max_bytes, min_free_bytes
        param = next(target.model.parameters())
        self._salt = json.dumps([FORMAT, str(target.name), str(param.dtype), param.device.type,
                                 list(feature_layers or []), torch.__version__]).encode()
        self.hits = self.misses = self.written = 0
        self._bytes = sum(p.stat().st_size for p in self.folder.glob("*.safetensors"))

    def key(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> str:
        h = hashlib.sha256(self._salt)
        for t in (input_ids, attention_mask):
            if t is not None:
                t = t.detach().to("cpu", torch.int64).contiguous()
                h.update(repr(tuple(t.shape)).encode())
                h.update(t.numpy().tobytes())
        return h.hexdigest()[:40]

    def get(self, key: str) -> dict[str, torch.Tensor] | None:
        if self.role == "write":
            return None
        path = self.folder / f"{key}.safetensors"
        try:
            from safetensors.torch import load_file

            feats = load_file(str(path))
        except (OSError, ValueError, RuntimeError):  # absent (or torn by a crash): compute it
            self.misses += 1
            return None
        self.hits += 1
        if self.role == "read":
            size = path.stat().st_size
            path.unlink(missing_ok=True)
            self._bytes -= size
        return feats

    def put(self, key: str, feats: dict[str, torch.Tensor]) -> None:
        if self.role == "read":
            return
        path = self.folder / f"{key}.safetensors"
        size = sum(v.numel() * v.element_size() for v in feats.values())
        if path.exists() or self._bytes + size > self.max_bytes:
            return
        if shutil.disk_usage(self.folder).free - size < self.min_free_bytes:
            return
        from safetensors.torch import save_file

        fd, tmp = tempfile.mkstemp(prefix=f".{key}.", suffix=".tmp", dir=self.folder)
        os.close(fd)
        try:
            save_file({k: v.detach().cpu().contiguous() for k, v in feats.items()}, tmp)
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
        self._bytes += path.stat().st_size
        self.written += 1
