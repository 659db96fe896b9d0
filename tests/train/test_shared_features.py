"""Features handed from a writing run to a reading run (train/shared_features.py)."""

from __future__ import annotations

import pytest
import torch
from helpers import tiny_llama

from prism_spec.train.features import capture_batch
from prism_spec.train.shared_features import SharedFeatures


@pytest.fixture(scope="module")
def target(one_thread):
    return tiny_llama(layers=2, dtype=torch.float32)


def test_shared_features_hand_a_batch_from_a_writer_to_one_reader(tmp_path, target):
    ids = torch.tensor([[5, 6, 7, 8], [9, 10, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    feats = capture_batch(target, ids, mask)
    writer = SharedFeatures(tmp_path, "write", target)
    reader = SharedFeatures(tmp_path, "read", target)
    key = writer.key(ids, mask)
    assert reader.key(ids, mask) == key
    assert writer.key(ids, torch.ones_like(mask)) != key and writer.key(ids.flip(0), mask.flip(0)) != key
    assert SharedFeatures(tmp_path, "write", target, feature_layers=[1]).key(ids, mask) != key
    assert writer.get(key) is None  # a writer never reads
    writer.put(key, feats)
    assert writer.written == 1 and len(list(tmp_path.glob("*.safetensors"))) == 1
    assert not list(tmp_path.glob(".*.tmp"))
    got = reader.get(key)
    assert torch.equal(got["hidden"], feats["hidden"])
    assert reader.get(key) is None and reader.hits == 1 and reader.misses == 1  # read once, then gone
    reader.put(key, feats)  # a reader never writes
    assert not list(tmp_path.glob("*.safetensors"))
    capped = SharedFeatures(tmp_path, "write", target, max_bytes=16)
    capped.put(key, feats)
    assert capped.written == 0 and not list(tmp_path.glob("*.safetensors"))
    with pytest.raises(ValueError, match="role"):
        SharedFeatures(tmp_path, "both", target)


def test_shared_features_reuse_is_a_cache_for_every_later_run(tmp_path, target):
    ids, mask = torch.tensor([[5, 6, 7]]), torch.ones(1, 3, dtype=torch.long)
    feats = capture_batch(target, ids, mask)
    first = SharedFeatures(tmp_path, "reuse", target)
    key = first.key(ids, mask)
    assert first.get(key) is None and first.misses == 1
    first.put(key, feats)  # computed on a miss: stored for the runs after it
    assert first.written == 1
    for _ in range(2):  # two more variants over the same batches
        again = SharedFeatures(tmp_path, "reuse", target)
        assert torch.equal(again.get(key)["hidden"], feats["hidden"]) and again.hits == 1
        again.put(key, {"hidden": torch.zeros(1)})  # already there: kept as it was
    assert len(list(tmp_path.glob("*.safetensors"))) == 1
    assert torch.equal(SharedFeatures(tmp_path, "read", target).get(key)["hidden"], feats["hidden"])
