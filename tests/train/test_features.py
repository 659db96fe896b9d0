"""Feature capture (offline cache and online batches) and batching, on a tiny random Llama."""

from __future__ import annotations

import functools
import json
import os

import pytest
import torch

from prism_spec.targets.hf import default_feature_layers
from prism_spec.train.batching import TokenizedDataset, collate
from prism_spec.train.chat import TokenizedExample
from prism_spec.train.features import (
    CorruptShardError,
    FeatureCacheMismatch,
    FeatureDataset,
    capture_batch,
    capture_features,
    load_index,
    shard_file,
    verify_features,
)
from helpers import forward_one

LENGTHS = [5, 9, 3, 12, 7, 4, 10]


@pytest.fixture(scope="module")
def target(one_thread):
    from helpers import tiny_llama

    return tiny_llama(layers=4, dtype=torch.float32)


@pytest.fixture(scope="module")
def examples():
    g = torch.Generator().manual_seed(0)
    out = []
    for n in LENGTHS:
        ids = torch.randint(0, 96, (n,), generator=g).tolist()
        out.append(TokenizedExample(ids, [0] * (n // 2) + [1] * (n - n // 2)))
    return out


@pytest.fixture(scope="module")
def reference(target, examples):
    """Per-example features from Target.forward (batch 1, no padding): what the cache must hold."""
    layers = default_feature_layers(target.num_layers)
    out = []
    for ex in examples:
        ids = torch.tensor(ex.input_ids)
        fo = forward_one(target, ids, torch.arange(len(ids)), target.new_cache(), feature_layers=layers)
        out.append((fo.features.clone(), fo.layer_features.clone()))
    return out


class CountingDecoder:
    """Counts target forwards by wrapping target.decoder."""

    def __init__(self, target, monkeypatch):
        self.calls = 0
        inner = target.decoder

        def call(*args, **kwargs):
            self.calls += 1
            return inner(*args, **kwargs)

        monkeypatch.setattr(target, "decoder", call)


def test_round_trip_matches_unpadded_forward(target, examples, reference, tmp_path):
    layers = default_feature_layers(target.num_layers)
    assert layers == (3, 3, 2)  # 4 layers: low 3, middle 4//2+1, high 4-2
    index = capture_features(
        target, examples, tmp_path, feature_layers=layers, dtype=torch.float32, shard_size=3, batch_size=2,
        progress=False,
    )
    assert index["complete"] and index["num_shards"] == 3 and index["num_examples"] == len(LENGTHS)
    assert index["target"] == "tiny-llama-0" and index["hidden_size"] == 32 and index["dtype"] == "float32"
    assert index["feature_layers"] == [3, 3, 2]
    assert [e["num_examples"] for e in index["shards"]] == [3, 3, 1]
    assert [e["num_tokens"] for e in index["shards"]] == [17, 23, 10]
    on_disk = json.loads((tmp_path / "index.json").read_text())
    assert [e["sha256"] for e in on_disk["shards"]] == [e["sha256"] for e in index["shards"]]
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith("shard-0000")) == ["index.json"]

    ds = FeatureDataset(tmp_path)
    assert len(ds) == len(LENGTHS) and ds.lengths() == LENGTHS
    for i, ex in enumerate(examples):
        item = ds[i]
        assert item["input_ids"].dtype == torch.long and item["input_ids"].tolist() == ex.input_ids
        assert item["loss_mask"].tolist() == ex.loss_mask
        assert item["hidden"].shape == (LENGTHS[i], 32) and item["layers"].shape == (LENGTHS[i], 96)
        torch.testing.assert_close(item["hidden"], reference[i][0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(item["layers"], reference[i][1], rtol=1e-5, atol=1e-5)
    assert ds[-1]["input_ids"].tolist() == examples[-1].input_ids
    with pytest.raises(IndexError):
        ds[len(LENGTHS)]


def test_default_bf16_without_layers(target, examples, reference, tmp_path):
    capture_features(target, examples[:4], tmp_path, shard_size=256, progress=False)
    ds = FeatureDataset(tmp_path, feature_dtype=torch.float32)
    assert ds.index["dtype"] == "bfloat16" and ds.feature_layers is None
    item = ds[3]
    assert set(item) == {"input_ids", "loss_mask", "hidden"} and item["hidden"].dtype == torch.float32
    torch.testing.assert_close(item["hidden"], reference[3][0], rtol=2e-2, atol=2e-2)
    assert FeatureDataset(tmp_path)[0]["hidden"].dtype == torch.bfloat16


def test_resume_skips_finished_shards(target, examples, tmp_path, monkeypatch):
    kw = dict(dtype=torch.float32, shard_size=2, batch_size=8, progress=False)
    capture_features(target, examples, tmp_path, **kw)  # 4 shards, one forward each
    before = {k: (tmp_path / shard_file(k)).stat().st_mtime_ns for k in range(4)}
    counter = CountingDecoder(target, monkeypatch)
    capture_features(target, examples, tmp_path, **kw)
    assert counter.calls == 0

    # Shard 1 lost its file, shard 2 is truncated, shard 3 never got its entry (crash before it).
    os.unlink(tmp_path / shard_file(1))
    p2 = tmp_path / shard_file(2)
    p2.write_bytes(p2.read_bytes()[:100])
    os.unlink(tmp_path / "shard-00003.json")
    with pytest.raises(FileNotFoundError, match=r"shards \[3\] missing"):
        FeatureDataset(tmp_path)
    capture_features(target, examples, tmp_path, **kw)
    assert counter.calls == 3
    assert (tmp_path / shard_file(0)).stat().st_mtime_ns == before[0]
    verify_features(tmp_path)
    assert len(FeatureDataset(tmp_path)) == len(LENGTHS)


def test_mismatched_cache_refused(target, examples, tmp_path):
    capture_features(target, examples, tmp_path, dtype=torch.float32, shard_size=4, progress=False)
    with pytest.raises(FeatureCacheMismatch, match="dtype"):
        capture_features(target, examples, tmp_path, dtype=torch.float16, shard_size=4, progress=False)
    with pytest.raises(FeatureCacheMismatch, match="feature_layers"):
        capture_features(target, examples, tmp_path, (1,), dtype=torch.float32, shard_size=4, progress=False)
    other = list(reversed(examples))
    with pytest.raises(FeatureCacheMismatch, match="other examples"):
        capture_features(target, other, tmp_path, dtype=torch.float32, shard_size=4, progress=False)


def test_corrupt_shard_raises_naming_the_file(target, examples, tmp_path):
    capture_features(target, examples, tmp_path, dtype=torch.float32, shard_size=4, progress=False)
    path = tmp_path / shard_file(1)
    data = bytearray(path.read_bytes())
    data[-7] ^= 0xFF  # flip bits inside the tensor data: same size, valid header
    path.write_bytes(bytes(data))
    ds = FeatureDataset(tmp_path)
    assert ds[0]["input_ids"].tolist() == examples[0].input_ids  # shard 0 is fine
    with pytest.raises(CorruptShardError, match="shard-00001.safetensors"):
        ds[5]
    with pytest.raises(CorruptShardError, match="shard-00001.safetensors"):
        verify_features(tmp_path)
    # Without the checksum the flip goes unseen, but a broken header never does.
    assert FeatureDataset(tmp_path, verify=False)[5]["hidden"].shape == (4, 32)
    data[0:8] = (10**9).to_bytes(8, "little")
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptShardError, match="shard-00001.safetensors"):
        FeatureDataset(tmp_path, verify=False)[5]


def test_two_process_split_equals_single_process(target, examples, tmp_path):
    kw = dict(feature_layers=(1, 4), dtype=torch.float32, shard_size=2, num_shards=2, progress=False)
    first = capture_features(target, examples, tmp_path / "split", shard_index=0, **kw)
    assert not first["complete"] and [e["shard"] for e in first["shards"]] == [0, 2]
    with pytest.raises(FileNotFoundError, match="incomplete"):
        FeatureDataset(tmp_path / "split")
    partial = FeatureDataset(tmp_path / "split", allow_missing=True)
    assert len(partial) == 4  # shards 0 and 2: examples 0, 1, 4, 5
    second = capture_features(target, examples, tmp_path / "split", shard_index=1, **kw)
    assert second["complete"] and [e["shard"] for e in second["shards"]] == [0, 1, 2, 3]
    assert load_index(tmp_path / "split")["complete"]

    kw.pop("num_shards")
    capture_features(target, examples, tmp_path / "single", **kw)
    split, single = FeatureDataset(tmp_path / "split"), FeatureDataset(tmp_path / "single")
    assert len(split) == len(single) == len(LENGTHS)
    for i in range(len(LENGTHS)):
        a, b = split[i], single[i]
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key])
    with pytest.raises(ValueError):
        capture_features(target, examples, tmp_path / "x", shard_index=2, num_shards=2, progress=False)


def test_online_capture_batch_and_collate(target, examples, reference):
    layers = default_feature_layers(target.num_layers)
    batch = collate([TokenizedDataset(examples)[i] for i in range(3)], pad_token_id=7)
    assert batch["input_ids"].shape == (3, 9) and batch["input_ids"].dtype == torch.long
    assert batch["attention_mask"].tolist()[2] == [1, 1, 1, 0, 0, 0, 0, 0, 0]
    assert batch["input_ids"][2, 3:].tolist() == [7] * 6
    assert batch["loss_mask"].tolist()[2] == [0, 1, 1, 0, 0, 0, 0, 0, 0]
    assert "hidden" not in batch
    feats = capture_batch(target, batch["input_ids"], batch["attention_mask"], layers)
    assert feats["hidden"].shape == (3, 9, 32) and feats["layers"].shape == (3, 9, 96)
    assert not feats["hidden"].requires_grad
    for b in range(3):
        n = LENGTHS[b]
        torch.testing.assert_close(feats["hidden"][b, :n], reference[b][0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(feats["layers"][b, :n], reference[b][1], rtol=1e-5, atol=1e-5)
    assert set(capture_batch(target, batch["input_ids"][:1, :5])) == {"hidden"}
    with pytest.raises(ValueError, match="out of range"):
        capture_batch(target, batch["input_ids"], batch["attention_mask"], (9,))
    cut = TokenizedDataset(examples, max_length=4)
    assert cut.lengths() == [4, 4, 3, 4, 4, 4, 4] and cut[1]["input_ids"].tolist() == examples[1].input_ids[:4]


def test_collate_feature_batches(target, examples, tmp_path):
    capture_features(target, examples, tmp_path, (1, 2), dtype=torch.bfloat16, shard_size=3, progress=False)
    ds = FeatureDataset(tmp_path)
    loader = torch.utils.data.DataLoader(
        ds, batch_size=4, shuffle=False, collate_fn=functools.partial(collate, feature_dtype=torch.float32)
    )
    batches = list(loader)
    assert [b["input_ids"].shape[0] for b in batches] == [4, 3]
    b = batches[0]
    assert b["hidden"].shape == (4, 12, 32) and b["hidden"].dtype == torch.float32
    assert b["layers"].shape == (4, 12, 64)
    assert b["attention_mask"].sum(1).tolist() == LENGTHS[:4]
    assert torch.all(b["hidden"][2, 3:] == 0) and torch.all(b["loss_mask"][2, 3:] == 0)
    torch.testing.assert_close(b["hidden"][1, :9], ds[1]["hidden"].float())
    capped = collate([ds[i] for i in range(4)], max_length=6)
    assert capped["hidden"].shape == (4, 6, 32) and capped["hidden"].dtype == torch.bfloat16
    with pytest.raises(ValueError, match="some examples"):
        collate([ds[0], {"input_ids": torch.tensor([1]), "loss_mask": torch.tensor([1])}])
