"""scripts/device: slimming the tree a device call sends, and the GPU corpus job run on a CPU
with a tiny target (what a lent session launches, end to end except the GPU)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from helpers import tiny_chat_target

from prism_spec.targets import load_target
from prism_spec.train.corpus.build import build_corpus, create_corpus
from prism_spec.train.corpus.engines import HFEngine
from prism_spec.train.corpus.read import read_corpus
from prism_spec.train.corpus.store import DecodingSettings

ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = ROOT / "scripts" / "device"


def git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=repo, check=True, capture_output=True, text=True).stdout


@pytest.fixture()
def repo(tmp_path) -> Path:
    """A small git checkout with the bundle script, code, and large results."""
    repo = tmp_path / "repo"
    (repo / "scripts" / "device").mkdir(parents=True)
    shutil.copy(SCRIPTS / "bundle.py", repo / "scripts" / "device" / "bundle.py")
    (repo / "src" / "pkg" / "assets").mkdir(parents=True)
    (repo / "src" / "pkg" / "code.py").write_text("x = 1\n")
    (repo / "src" / "pkg" / "assets" / "weights.bin").write_bytes(b"w" * 4096)
    (repo / "results" / "run").mkdir(parents=True)
    (repo / "results" / "run" / "big.bin").write_bytes(b"r" * 100_000)
    (repo / "docs").mkdir()
    (repo / "docs" / "a.md").write_text("docs\n")
    (repo / "pyproject.toml").write_text("[project]\nname='x'\n")
    git(repo, "init", "-q")
    git(repo, "-c", "user.email=t@t", "-c", "user.name=t", "add", "-A")
    git(repo, "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "init")
    return repo


def bundle(repo: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "scripts/device/bundle.py", *args], cwd=repo, capture_output=True,
                          text=True)


def test_slim_sends_only_code_and_restore_undoes_it(repo):
    before = git(repo, "ls-files").splitlines()
    out = bundle(repo, "slim")
    assert out.returncode == 0, out.stderr
    tracked = git(repo, "ls-files").splitlines()
    assert tracked == ["pyproject.toml", "scripts/device/bundle.py", "src/pkg/code.py"]
    # Nothing untracked-and-not-ignored appears: the slimmed files are ignored, still on disk.
    assert git(repo, "ls-files", "--others", "--exclude-standard") == ""
    assert (repo / "results" / "run" / "big.bin").exists() and (repo / "src/pkg/assets/weights.bin").exists()
    assert "slimmed" in bundle(repo, "status").stdout
    assert bundle(repo, "slim").returncode != 0  # twice is refused
    out = bundle(repo, "restore")
    assert out.returncode == 0, out.stderr
    assert git(repo, "ls-files").splitlines() == before
    assert git(repo, "status", "--porcelain") == ""
    assert "prism-spec device bundle" not in (repo / ".git" / "info" / "exclude").read_text()
    assert bundle(repo, "restore").stdout.strip() == "nothing to restore"


def test_slim_refuses_staged_changes(repo):
    (repo / "docs" / "a.md").write_text("changed\n")
    git(repo, "add", "docs/a.md")
    out = bundle(repo, "slim")
    assert out.returncode != 0 and "staged" in out.stderr
    assert git(repo, "diff", "--cached", "--name-only").strip() == "docs/a.md"


def load_bundle_module(repo: Path, bundle_dir: Path, monkeypatch):
    import importlib.util

    monkeypatch.setenv("PRISM_DEVICE_BUNDLE", str(bundle_dir))
    spec = importlib.util.spec_from_file_location("bundle_under_test", repo / "scripts/device/bundle.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_pack_plans_calls_under_the_limit_and_assemble_rebuilds_the_gguf(repo, tmp_path, monkeypatch):
    mod = load_bundle_module(repo, tmp_path / "bundle", monkeypatch)
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(os.urandom(3 * 2**20 + 123))
    manifest = mod.pack(None, part_mib=1, wheels=False, gguf=str(gguf))
    assert manifest["parts"] == ["target.part0", "target.part1", "target.part2", "target.part3"]
    # Items are packed into calls that stay under the per-call limit next to the tree.
    sizes = {k: v["bytes"] for k, v in manifest["items"].items()}
    calls = mod.plan_calls(sizes, tree=1 * 2**20, limit=4 * 2**20)
    assert sorted(n for c in calls for n in c) == sorted(sizes)
    assert all(sum(sizes[n] for n in c) <= 2 * 2**20 for c in calls)
    with pytest.raises(SystemExit, match="does not fit"):
        mod.plan_calls(sizes, tree=3 * 2**20, limit=4 * 2**20)
    stash = tmp_path / "stash"
    items = tmp_path / "bundle" / "items"
    for part in manifest["parts"][:-1]:  # earlier calls stash their items; the last call carries its own
        mod.stash([str(items / part)], str(stash))
        (items / part).unlink()
    out = mod.assemble(str(tmp_path / "site"), str(stash))
    assert out.read_bytes() == gguf.read_bytes() and (out.parent / "__init__.py").exists()
    (stash / "target.part1").write_bytes(b"corrupt")
    with pytest.raises(SystemExit, match="sha256"):
        mod.assemble(str(tmp_path / "site"), str(stash))
    (stash / "target.part1").unlink()
    with pytest.raises(SystemExit, match="missing"):
        mod.assemble(str(tmp_path / "site"), str(stash))


def test_gpu_job_on_a_cpu(tmp_path):
    """The device job end to end on a CPU with a tiny target: it answers the unfinished corpus
    shards (from the last one down), trains a campaign level on the corpus, and what it returns
    merges into the local corpus and campaign folders."""
    from prism_spec.train import campaign as camp

    (tmp_path / "target").mkdir()
    target_dir = tiny_chat_target(tmp_path / "target")
    target = load_target(target_dir)
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"question": f"Add {i} and {i + 3}.", "answer": "-"}) + "\n"
                               for i in range(20)))
    settings = DecodingSettings(max_new_tokens=6)
    local = tmp_path / "local"
    create_corpus(local, target, [str(prompts)], settings, shard_size=5, progress=False)
    build_corpus(local, HFEngine(target, batch_size=5), shards=[0], progress=False)  # the CPU's share so far
    campaign = tmp_path / "campaign"
    camp.init_campaign(campaign, camp.CampaignConfig(
        target=target_dir, data=[str(local)], base_steps=4, batch_size=2, max_length=48, draft_vocab_size=64,
        holdout=2, dtype="float32", mixed_precision="no"))
    bundle_dir = tmp_path / "bundle"
    fake_gguf = tmp_path / "unused.gguf"  # a folder target needs no GGUF; pack still splits one
    fake_gguf.write_bytes(b"gguf")
    packed = subprocess.run([sys.executable, str(SCRIPTS / "bundle.py"), "pack", "--no-wheels", "--gguf", str(fake_gguf),
                             "--corpus", str(local), "--campaign", str(campaign)],
                            env=dict(os.environ, PRISM_DEVICE_BUNDLE=str(bundle_dir)), capture_output=True, text=True)
    assert packed.returncode == 0, packed.stderr
    assert "call 1" in packed.stdout and "gpu_job.sh" in packed.stdout
    out = tmp_path / "out"
    env = dict(os.environ, OUT=str(out), BUNDLE=str(bundle_dir), WORK=str(tmp_path / "work"),
               SITE=str(tmp_path / "site"), DEVICE="cpu", TARGET=target_dir, BATCH="4", CORPUS_SECONDS="600",
               CAMPAIGN_SECONDS="600", CAMPAIGN_MAX_LEVELS="1", THROUGHPUT_STEPS="2", THROUGHPUT_BATCH="2",
               THROUGHPUT_MAX_LENGTH="48", THROUGHPUT_VOCAB="64")
    run = subprocess.run(["bash", str(SCRIPTS / "gpu_job.sh")], env=env, capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    log = (out / "gpu_job.log").read_text()
    assert "3 new corpus shards" in log and "level 0 done" in log
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("result.tar.part-"))
    earlier = campaign / "levels" / "L7" / "eagle2"  # a level kept here that the call did not carry
    earlier.mkdir(parents=True)
    (earlier / "config.json").write_text("{}")
    unpacked = subprocess.run([sys.executable, str(SCRIPTS / "bundle.py"), "unpack", str(out), "--corpus", str(local),
                               "--campaign", str(campaign), "--results", str(tmp_path / "measured")],
                              capture_output=True, text=True)
    assert unpacked.returncode == 0, unpacked.stderr
    result = json.loads(unpacked.stdout)
    assert result["shards_added"] == ["shard-00001", "shard-00002", "shard-00003"]
    assert result["campaign_segments"] == 4
    assert (earlier / "config.json").is_file() and (campaign / "levels" / "L0" / "prism" / "model.safetensors").is_file()
    assert sorted(p.name for p in (tmp_path / "measured").iterdir()) == [
        "corpus_status.json", "gpu_job.log", "train_throughput.json"]
    whole = tmp_path / "whole"
    create_corpus(whole, target, [str(prompts)], settings, shard_size=5, progress=False)
    build_corpus(whole, HFEngine(target, batch_size=5), progress=False)
    assert [(e.key, e.reply_ids) for e in read_corpus(local)] == [(e.key, e.reply_ids) for e in read_corpus(whole)]
    with tarfile.open(next(out.glob("result.tar.part-aa"))) as tar:  # one part: the tiny result is small
        rows = json.load(tar.extractfile("./train_throughput.json"))["rows"]
    assert {(r["recipe"], r["group_by_length"]) for r in rows} == {
        (recipe, grouped) for recipe in ("eagle2", "hass", "prism-tuning") for grouped in (False, True)}
    assert all(0 < r["target_share"] < 1 for r in rows)  # the frozen target's part of each step
    state = camp.read_state(campaign)
    assert list(state["levels"]) == ["0"] and set(state["drafters"]) == {"eagle2", "hass", "prism"}
    assert all((campaign / path / "model.safetensors").is_file() for path in state["drafters"].values())
