"""Training examples: the configured data read, split into training and held-out parts,
subset, tokenised with the target's chat template and filtered (:func:`load_examples`), and
batches of them with the target's features, computed online or read from the offline
feature cache (:class:`BatchSource`)."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch

from ..targets.hf import Target
from .config import TrainConfig
from .errors import ConfigError, TrainingError


@dataclasses.dataclass
class Example:
    input_ids: torch.Tensor  # [T] long
    loss_mask: torch.Tensor  # [T] bool/long


def _as_long(x) -> torch.Tensor:
    return x.detach().long().flatten() if isinstance(x, torch.Tensor) else torch.tensor(list(x), dtype=torch.long)


def load_examples(config: TrainConfig, tokenizer) -> tuple[list[Example], list[Example], dict]:
    """Read, split, subset and tokenize the training data; returns (train, holdout, stats).

    The held-out split is taken first and ``fraction`` / ``max_examples`` then sample the
    training part (nested, seeded subsets), so data-scaling runs share one validation set.
    """
    from .chat import tokenize_conversation
    from .corpus.read import CorpusExample, read_corpus
    from .corpus.store import is_corpus
    from .mix import load_training_mix, sample, split_heldout

    data = config.data
    paths = [str(p) for p in data.paths]
    corpora = [p for p in paths if is_corpus(p)]  # token-id corpora (prism corpus build)
    try:
        conversations, reader_stats = load_training_mix([p for p in paths if p not in corpora], dedupe=data.dedupe)
        corpus_examples = [ex for folder in corpora for ex in read_corpus(folder, shards=data.corpus_shards)]
    except (FileNotFoundError, ValueError) as e:
        raise ConfigError(f"cannot read the training data: {e}") from None
    stats = reader_stats.as_dict() if hasattr(reader_stats, "as_dict") else {"reader": str(reader_stats)}
    stats.pop("sources", None)
    if corpora:
        stats["corpus_replies"] = len(corpus_examples)
        if not corpus_examples and not conversations:
            raise TrainingError(f"the corpora {corpora} hold no finished shard yet (prism corpus status)")
    conversations = conversations + corpus_examples
    if not conversations:
        raise TrainingError(f"no conversation could be read from {list(data.paths)} ({reader_stats})")
    holdout = int(data.holdout) if data.holdout >= 1 else float(data.holdout)
    if 0 < data.holdout < 1 and len(conversations) >= 2 and round(len(conversations) * data.holdout) == 0:
        holdout = 1  # a tiny data set still gets a validation example
    if isinstance(holdout, int):
        holdout = min(holdout, len(conversations) - 1)
    train_convs, held_convs = split_heldout(conversations, holdout, seed=data.seed)
    if data.fraction < 1.0:
        train_convs = sample(train_convs, float(data.fraction), seed=data.seed)
    if data.max_examples is not None and len(train_convs) > data.max_examples:
        train_convs = sample(train_convs, int(data.max_examples), seed=data.seed)

    def tokenize(convs) -> tuple[list[Example], int]:
        out, dropped = [], 0
        for conv in convs:
            tok = conv if isinstance(conv, CorpusExample) else tokenize_conversation(tokenizer, conv, data.max_length)
            ids, mask = _as_long(tok.input_ids[:data.max_length]), _as_long(tok.loss_mask[:data.max_length])
            # Usable: at least 3 tokens and an assistant token that some earlier token predicts.
            if ids.numel() < 3 or int(mask[2:].sum()) == 0:
                dropped += 1
                continue
            out.append(Example(ids, mask.bool()))
        return out, dropped

    train, dropped = tokenize(train_convs)
    held, dropped_held = tokenize(held_convs)
    if not train:
        hint = ""
        if stats.get("prompt_only"):
            hint = (f"; {stats['prompt_only']} conversations are prompt-only (no assistant reply): "
                    "generate replies with the target first (prism_spec.train.regenerate)")
        raise TrainingError(
            f"the training data is empty after filtering: {len(train_convs)} conversations from "
            f"{list(data.paths)}, none has an assistant token to train on within max_length={data.max_length}{hint}"
        )
    stats.update(
        {"train_conversations": len(train_convs), "holdout_conversations": len(held_convs),
         "dropped_no_target_tokens": dropped + dropped_held,
         "train_examples": len(train), "holdout_examples": len(held),
         "train_tokens": int(sum(e.input_ids.numel() for e in train)),
         "train_loss_tokens": int(sum(int(e.loss_mask.sum()) for e in train))}
    )
    return train, held, stats


def data_summary(stats: dict, seconds: float, max_length: int) -> list[str]:
    """Console lines on what :func:`load_examples` (its ``stats``) kept, skipped and dropped."""
    lines = [
        f"[train] data: {stats['train_examples']} training / {stats['holdout_examples']} "
        f"held-out examples, {stats['train_loss_tokens']} trained tokens ({seconds:.1f} s)"
    ]
    skipped = stats.get("skipped") or {}
    if skipped:  # bad records never stop a run, so say how many there were
        reasons = ", ".join(f"{reason}={n}" for reason, n in skipped.items())
        lines.append(f"[train] data: skipped {sum(skipped.values())} malformed record(s) of "
                     f"{stats.get('read', '?')} read ({reasons})")
    if stats.get("dropped_no_target_tokens"):
        lines.append(f"[train] data: dropped {stats['dropped_no_target_tokens']} conversation(s) with "
                     f"no assistant token to train on within max_length={max_length}")
    return lines


class BatchSource:
    """Turns lists of example indices into model-ready batches (online or offline features)."""

    def __init__(self, examples: list[Example], target: Target, feature_layers, device, pad_id: int,
                 feature_dataset=None, shared=None):
        self.examples = examples
        self.target = target
        self.feature_layers = feature_layers
        self.device = device
        self.pad_id = pad_id
        self.features = feature_dataset  # offline: indexable like ``examples``
        self.shared = shared  # online: features.SharedFeatures handed between runs, or None

    def __len__(self):
        return len(self.examples)

    def batch(self, indices: Sequence[int]) -> dict[str, torch.Tensor]:
        if self.features is not None:
            from .batching import collate

            items = [self.features[i] for i in indices]
            batch = collate(items, pad_token_id=self.pad_id)
            return {k: (v.to(self.device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}
        batch = _collate_tokens([self.examples[i] for i in indices], self.pad_id)
        batch = {k: (v.to(self.device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}
        from .features import capture_batch

        key = self.shared.key(batch["input_ids"], batch["attention_mask"]) if self.shared is not None else None
        feats = self.shared.get(key) if key is not None else None
        if feats is not None:
            feats = {k: v.to(self.device) for k, v in feats.items()}
        else:
            with torch.no_grad():
                feats = capture_batch(self.target, batch["input_ids"], batch["attention_mask"], self.feature_layers)
            if key is not None:
                self.shared.put(key, feats)
        for key, value in feats.items():
            if isinstance(value, torch.Tensor):
                # Inference-mode tensors cannot be saved for backward: give autograd a plain copy.
                batch[key] = value.clone() if value.is_inference() else value
            elif value is not None:
                batch[key] = value
        return batch


def _collate_tokens(examples: Sequence[Example], pad_id: int) -> dict[str, torch.Tensor]:
    from .batching import collate

    return collate([{"input_ids": e.input_ids, "loss_mask": e.loss_mask.long()} for e in examples],
                   pad_token_id=pad_id)


def offline_features(accelerator, target: Target, examples: list[Example], folder, feature_layers, dtype,
                     progress: bool = False):
    """The offline features of ``examples``: captured from ``target`` into the cache ``folder``
    (the shards split over the processes; shards already there are reused), then, once every
    process is done, read lazily (a FeatureDataset, indexable like ``examples``)."""
    from . import features

    try:
        features.capture_features(
            target, [{"input_ids": e.input_ids, "loss_mask": e.loss_mask} for e in examples], folder,
            feature_layers=feature_layers, dtype=dtype,
            shard_index=accelerator.process_index, num_shards=accelerator.num_processes, progress=progress,
        )
    except features.FeatureCacheMismatch as e:
        raise TrainingError(f"feature cache {folder}: {e}") from None
    accelerator.wait_for_everyone()
    return features.FeatureDataset(folder)
