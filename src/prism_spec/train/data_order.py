"""The order in which training reads its examples: a pure function of the seed, the stage and
the step, so a resumed run reads exactly what an uninterrupted one would have."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import torch


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
            g = torch.Generator().manual_seed(mix_seed(self.seed, 7919 * (self.stage + 1), epoch))
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


def mix_seed(*parts: int) -> int:
    """A 63-bit seed from integers (a hash: nearby inputs give unrelated seeds)."""
    h = hashlib.sha256(":".join(str(int(p)) for p in parts).encode()).digest()
    return int.from_bytes(h[:8], "little") & ((1 << 63) - 1)
