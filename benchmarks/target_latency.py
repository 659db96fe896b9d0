"""Target forward latency and vanilla decoding speed on the default target (CPU, batch 1).

    python benchmarks/target_latency.py [--repeats 7] [--max-new-tokens 64] [--json out.json]

(a) Latency of one target forward over n = 1..64 new tokens on top of a ~300-token prefix:
    ``Target.forward`` with a chain (causal) tree mask and with a random tree mask, and the raw
    transformers forward ``model(input_ids, cache=...)`` (transformers builds its own mask).
    After each call the cache is cut back to the prefix, so every call sees the same prefix.
(b) Vanilla decoding: our ``generate(target, ids, None, cfg)`` vs transformers'
    ``model.generate(do_sample=False)`` on the same chat prompt; token ids must match.
(c) Variants: plain nn.Linear instead of prepacked weights (load_target's CPU default since
    2026-11-26), one torch thread, bfloat16 weights, the
    model de-quantised straight from the GGUF file by transformers, and the float32 model
    while a competing busy process occupies one core (a loaded, shared machine).

This is a measurement script, not a test. Each row reports how much CPU *other* processes
used while it was measured: on a shared 2-core machine they change the numbers a lot (see
``--wait-idle``).
"""

from __future__ import annotations

import argparse
import datetime
import json
import multiprocessing
import os
import platform
import statistics
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import torch

from prism_spec.bench.machine import cpu_name
import transformers

from prism_spec.runtime import GenerationConfig, generate
from prism_spec.runtime.tree import ancestor_mask
from prism_spec.targets import default_target_path, load_target
from prism_spec.targets.default import GGUF_FILE, _gguf_folder
from prism_spec.targets.hf import Target, cache_kwarg
from prism_spec.targets.kv_cache import truncate_cache

SIZES = (1, 2, 4, 8, 16, 32, 64)
VARIANT_SIZES = (1, 2, 8)
CHAT_PROMPT = "Write a short story about a robot who learns to paint."
BENCH_DATA = Path(__file__).resolve().parents[1] / "src" / "prism_spec" / "data" / "bench" / "sum.jsonl"


# ---------------------------------------------------------------------- helpers
def loadavg() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


class CpuMonitor:
    """CPU time used by *other* processes over an interval, as a fraction of all cores.

    Whole-machine busy time from /proc/stat minus this process's own CPU time: 0 on an idle
    machine, 0.5 when other processes keep one of two cores busy.
    """

    def __init__(self):
        self.available = Path("/proc/stat").exists()
        self.start = self._snapshot()

    @staticmethod
    def _busy_s() -> float:
        fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
        return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")

    def _snapshot(self):
        return (time.perf_counter(), self._busy_s() if self.available else 0.0, time.process_time())

    def others(self) -> float | None:
        """Fraction since construction (or the last call), and restart the interval."""
        end = self._snapshot()
        (w0, b0, o0), (w1, b1, o1) = self.start, end
        self.start = end
        if not self.available or w1 - w0 <= 0:
            return None
        return round(max(0.0, ((b1 - b0) - (o1 - o0)) / ((w1 - w0) * (os.cpu_count() or 1))), 3)


def wait_until_idle(max_s: float, threshold: float = 0.15, quiet_windows: int = 3) -> float | None:
    """Wait (up to max_s) until other processes use < threshold of the CPUs for a few seconds."""
    if max_s <= 0 or not Path("/proc/stat").exists():
        return None
    deadline, quiet = time.monotonic() + max_s, 0
    mon = CpuMonitor()
    while time.monotonic() < deadline:
        time.sleep(2.0)
        load = mon.others()
        quiet = quiet + 1 if load is not None and load < threshold else 0
        if quiet >= quiet_windows:
            return load
    print(f"warning: the machine did not become idle within {max_s:.0f} s; measuring anyway",
          file=sys.stderr, flush=True)
    return mon.others()


def median_ms(fn, repeats: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def prefix_ids(target: Target, n_tokens: int) -> torch.Tensor:
    """A chat-rendered summarisation prompt cut (or repeated) to exactly ``n_tokens`` tokens."""
    texts = [json.loads(line)["turns"][0] for line in BENCH_DATA.read_text().splitlines()[:8]]
    ids = target.encode_prompt("\n\n".join(texts))
    while len(ids) < n_tokens:
        ids = ids + ids
    return torch.tensor(ids[:n_tokens])


def random_tree(n: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Random tree of n nodes, parents before children: (ancestor mask, depths)."""
    parents = torch.full((n,), -1, dtype=torch.long)
    depths = torch.zeros(n, dtype=torch.long)
    for i in range(1, n):
        parents[i] = int(torch.randint(0, i, (1,), generator=gen))
        depths[i] = depths[parents[i]] + 1
    return ancestor_mask(parents, depths), depths


class ForwardBench:
    """Times forwards of n new tokens on top of a fixed prefix in the KV cache."""

    def __init__(self, target: Target, prefix: torch.Tensor, repeats: int, warmup: int):
        self.target, self.repeats, self.warmup = target, repeats, warmup
        self.prefix_len = prefix.numel()
        self.cache = target.new_cache()
        target.forward(prefix[None], torch.arange(self.prefix_len)[None], self.cache)
        self.gen = torch.Generator().manual_seed(0)
        self._kw = cache_kwarg(target.model)

    def _reset(self):
        truncate_cache(self.cache, self.prefix_len)

    def ours(self, n: int, kind: str) -> float:
        tokens = torch.randint(0, self.target.vocab_size, (n,), generator=self.gen)
        if kind == "chain":
            mask = torch.ones(n, n, dtype=torch.bool).tril()
            positions = torch.arange(n) + self.prefix_len
        else:
            mask, depths = random_tree(n, self.gen)
            positions = depths + self.prefix_len

        def call():
            self.target.forward(tokens[None], positions[None], self.cache, mask[None])
            self._reset()

        return median_ms(call, self.repeats, self.warmup)

    def raw(self, n: int) -> float:
        tokens = torch.randint(0, self.target.vocab_size, (1, n), generator=self.gen)
        model = self.target.model

        @torch.inference_mode()
        def call():
            model(input_ids=tokens, use_cache=True, **{self._kw: self.cache})
            self._reset()

        return median_ms(call, self.repeats, self.warmup)

    def sequential(self, n: int) -> float:
        """n one-token forwards in a row (what n vanilla decoding steps cost)."""
        tokens = torch.randint(0, self.target.vocab_size, (n,), generator=self.gen)
        mask = torch.ones(1, 1, dtype=torch.bool)

        def call():
            for i in range(n):
                self.target.forward(tokens[None, i : i + 1], torch.tensor([[self.prefix_len + i]]), self.cache, mask[None])
            self._reset()

        return median_ms(call, self.repeats, self.warmup)


@contextmanager
def torch_threads(n: int):
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _spin(stop):  # a competing CPU-bound process
    x = 0
    while not stop.is_set():
        for _ in range(100_000):
            x += 1


@contextmanager
def busy_core():
    ctx = multiprocessing.get_context("spawn")
    stop = ctx.Event()
    proc = ctx.Process(target=_spin, args=(stop,), daemon=True)
    proc.start()
    time.sleep(0.5)
    try:
        yield
    finally:
        stop.set()
        proc.join(5)
        if proc.is_alive():
            proc.terminate()
            proc.join()


# ---------------------------------------------------------------------- sections
def measure_quietly(fn, args, label: str, expected_others: float = 0.0) -> dict:
    """``fn()`` -> dict of timings, plus ``others_cpu`` and ``attempts``.

    When other processes used more than ``--max-others`` of the CPUs (beyond what the
    measurement itself expects, e.g. its own busy helper) the numbers are thrown away: wait
    for an idle machine and measure again, at most ``--attempts`` times; the last attempt is
    kept whatever happened, and its ``others_cpu`` says so.
    """
    for attempt in range(1, args.attempts + 1):
        mon = CpuMonitor()
        row = fn()
        others = mon.others()
        row.update(others_cpu=others, attempts=attempt)
        if others is None or others <= expected_others + args.max_others or attempt == args.attempts:
            return row
        print(f"  {label}: other processes took {_pct(others).strip()} of the CPUs; waiting to measure again",
              file=sys.stderr, flush=True)
        wait_until_idle(args.wait_idle, threshold=expected_others + args.max_others)
    raise AssertionError("unreachable")


def bench_forward(target: Target, args) -> list[dict]:
    bench = ForwardBench(target, prefix_ids(target, args.prefix_tokens), args.repeats, args.warmup)
    rows = []
    for n in args.sizes:
        row = measure_quietly(
            lambda: {"n": n, "chain_ms": bench.ours(n, "chain"), "tree_ms": bench.ours(n, "tree"), "raw_ms": bench.raw(n)},
            args, f"n={n}",
        )
        rows.append(row)
        print(f"  n={n:3d}: chain {row['chain_ms']:7.1f} ms, tree {row['tree_ms']:7.1f} ms, "
              f"raw {row['raw_ms']:7.1f} ms  (other processes: {_pct(row['others_cpu'])} CPU)",
              file=sys.stderr, flush=True)
    return rows


def _pct(x: float | None) -> str:
    return "  n/a" if x is None else f"{100 * x:4.0f}%"


def bench_vanilla(target: Target, args) -> dict:
    ids = target.encode_prompt(CHAT_PROMPT)
    n = args.max_new_tokens
    cfg = GenerationConfig(max_new_tokens=n)
    input_ids = torch.tensor([ids])
    model = target.model

    def hf():
        with torch.inference_mode():
            return model.generate(
                input_ids, attention_mask=torch.ones_like(input_ids), do_sample=False, max_new_tokens=n,
                pad_token_id=target.tokenizer.pad_token_id,
            )[0, len(ids):].tolist()

    generate(target, ids, None, GenerationConfig(max_new_tokens=8))  # warm-up
    hf()

    def run() -> dict:
        ours_tps, hf_tps, ours_ids, hf_ids = [], [], None, None
        for _ in range(args.gen_repeats):  # interleaved, so drifting load hits both alike
            result = generate(target, ids, None, cfg)
            ours_ids = result.token_ids
            ours_tps.append(len(result.token_ids) / result.total_s)
            t0 = time.perf_counter()
            hf_ids = hf()
            hf_tps.append(len(hf_ids) / (time.perf_counter() - t0))
        return {
            "prompt_tokens": len(ids),
            "new_tokens": len(ours_ids),
            "ours_tokens_per_s": statistics.median(ours_tps),
            "hf_tokens_per_s": statistics.median(hf_tps),
            "token_ids_equal": ours_ids == hf_ids,
            "hf_new_tokens": len(hf_ids),
        }

    return measure_quietly(run, args, "vanilla decoding")


def bench_variants(target: Target, args) -> list[dict]:
    prefix = prefix_ids(target, args.prefix_tokens)
    sizes = [n for n in VARIANT_SIZES if n <= max(args.sizes)]

    def measure(name: str, t: Target, note: str, sequential: bool = False, expected_others: float = 0.0) -> dict:
        bench = ForwardBench(t, prefix, args.repeats, args.warmup)

        def run() -> dict:
            row = {"variant": name, "note": note, "dtype": str(t.dtype).replace("torch.", ""),
                   "threads": torch.get_num_threads()}
            for n in sizes:
                row[f"chain_{n}"] = bench.ours(n, "chain")
                row[f"raw_{n}"] = bench.raw(n)
            if sequential:
                row["seq_2"] = bench.sequential(2)
            return row

        row = measure_quietly(run, args, name, expected_others)
        timings = ", ".join(f"{k} {v:.1f}" for k, v in row.items() if isinstance(v, float) and k != "others_cpu")
        print(f"  {name}: {timings} (other processes: {_pct(row['others_cpu'])} CPU)",
              file=sys.stderr, flush=True)
        return row

    rows = [measure("float32", target, "the default: cached float32 safetensors, prepacked CPU weights", sequential=True)]
    plain = load_target(str(default_target_path()), pack_weights=False)
    rows.append(measure("float32, plain nn.Linear", plain, "load_target(pack_weights=False)", sequential=True))
    del plain
    with torch_threads(1):
        rows.append(measure("float32, 1 thread", target, "torch.set_num_threads(1)", sequential=True))
    one_core = 1 / (os.cpu_count() or 1)  # the busy helper's expected share
    with busy_core():
        rows.append(measure("float32, 1 core busy", target,
                            f"a competing busy process, {torch.get_num_threads()} torch threads", sequential=True,
                            expected_others=one_core))
    with busy_core(), torch_threads(1):
        rows.append(measure("float32, 1 core busy, 1 thread", target, "both of the above",
                            expected_others=one_core))
    bf16 = load_target(str(default_target_path()), dtype="bfloat16")
    rows.append(measure("bfloat16", bf16, "load_target(dtype='bfloat16'), prepacked CPU weights"))
    del bf16
    bf16 = load_target(str(default_target_path()), dtype="bfloat16", pack_weights=False)
    rows.append(measure("bfloat16, plain nn.Linear", bf16, "load_target(dtype='bfloat16', pack_weights=False)"))
    del bf16
    if not args.no_gguf:
        t0 = time.perf_counter()
        folder = _gguf_folder()
        tok = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=GGUF_FILE)
        model = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF_FILE)
        load_s = time.perf_counter() - t0
        gguf = Target(model, tok, name="gguf")
        rows.append(measure("GGUF via transformers", gguf,
                            f"from_pretrained(gguf_file=...), default dtype, loaded in {load_s:.0f} s"))
        del gguf, model
    return rows


# ---------------------------------------------------------------------- report
def machine_info() -> dict:
    return {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "platform": platform.platform(),
        "processor": cpu_name(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "torch_threads": torch.get_num_threads(),
        "load_average_1min_start": loadavg(),
    }


def print_report(info: dict, forward: list[dict], vanilla: dict, variants: list[dict], args) -> None:
    print("# Target latency: default target, CPU, batch 1")
    for key, value in info.items():
        print(f"{key:26} {value}")
    print(f"\n## (a) one forward over n new tokens on a {args.prefix_tokens}-token prefix "
          f"(median of {args.repeats}, {args.warmup} warm-up)")
    print(f"{'n':>4} | {'chain ms':>9} {'ms/tok':>7} | {'rnd tree ms':>11} {'ms/tok':>7} | {'raw HF ms':>9} {'ms/tok':>7}"
          f" | {'others':>6}")
    print("-" * 79)
    for r in forward:
        n = r["n"]
        print(f"{n:4d} | {r['chain_ms']:9.1f} {r['chain_ms'] / n:7.2f} | {r['tree_ms']:11.1f} {r['tree_ms'] / n:7.2f} "
              f"| {r['raw_ms']:9.1f} {r['raw_ms'] / n:7.2f} | {_pct(r['others_cpu']):>6}")
    print("others = CPU time used by other processes during the row, as a share of all cores")
    print(f"\n## (b) vanilla decoding, {vanilla['new_tokens']} new tokens after a {vanilla['prompt_tokens']}-token "
          f"chat prompt (median of {args.gen_repeats})")
    print(f"ours generate(drafter=None)   {vanilla['ours_tokens_per_s']:7.1f} tokens/s")
    print(f"HF model.generate(greedy)     {vanilla['hf_tokens_per_s']:7.1f} tokens/s")
    print(f"token ids equal               {vanilla['token_ids_equal']}")
    print(f"other processes' CPU share    {_pct(vanilla['others_cpu']).strip()}")
    if variants:
        sizes = [n for n in VARIANT_SIZES if f"chain_{n}" in variants[0]]
        print("\n## (c) variants: one forward, ms (chain = Target.forward; raw = HF forward; "
              "2x1 = two 1-token forwards in a row)")
        head = " ".join(f"{'chain ' + str(n):>8} {'raw ' + str(n):>7}" for n in sizes)
        print(f"{'variant':32} {'dtype':>8} {'thr':>3} {'others':>6} | {head} | {'2x1':>6}")
        print("-" * (59 + 17 * len(sizes)))
        for r in variants:
            cells = " ".join(f"{r[f'chain_{n}']:8.1f} {r[f'raw_{n}']:7.1f}" for n in sizes)
            seq = f"{r['seq_2']:6.1f}" if "seq_2" in r else f"{'':>6}"
            print(f"{r['variant']:32} {r['dtype']:>8} {r['threads']:3d} {_pct(r['others_cpu']):>6} | {cells} | {seq}")
        for r in variants:
            print(f"  {r['variant']}: {r['note']}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=7, help="timed repeats per cell (median reported)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls before each cell")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="tokens generated in part (b)")
    parser.add_argument("--gen-repeats", type=int, default=3, help="generations per method in part (b)")
    parser.add_argument("--prefix-tokens", type=int, default=300)
    parser.add_argument("--sizes", type=lambda s: [int(x) for x in s.split(",")], default=list(SIZES),
                        help="comma-separated new-token counts for part (a)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads for (a) and (b)")
    parser.add_argument("--no-variants", action="store_true", help="skip part (c)")
    parser.add_argument("--no-gguf", action="store_true", help="skip the GGUF load in part (c)")
    parser.add_argument("--json", metavar="OUT", help="also write all numbers to OUT as JSON")
    parser.add_argument("--wait-idle", type=float, default=300, metavar="S",
                        help="before starting and before each re-measurement, wait up to S seconds for other "
                        "processes to leave the CPUs idle (0: never wait; default: 300)")
    parser.add_argument("--max-others", type=float, default=0.1, metavar="F",
                        help="re-measure a row when other processes used more than this share of the CPUs "
                        "(default: 0.1)")
    parser.add_argument("--attempts", type=int, default=3, help="measurements per row at most (default: 3)")
    args = parser.parse_args(argv)
    if min(args.repeats, args.max_new_tokens, args.prefix_tokens, args.attempts, args.gen_repeats) < 1:
        parser.error("--repeats, --max-new-tokens, --prefix-tokens, --attempts and --gen-repeats must be >= 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    transformers.utils.logging.disable_progress_bar()

    if args.wait_idle > 0:
        print(f"waiting up to {args.wait_idle:.0f} s for an idle machine ...", file=sys.stderr, flush=True)
        wait_until_idle(args.wait_idle)
    info = machine_info()
    target = load_target()
    info["target"] = f"{target.name} ({target.num_layers} layers, hidden {target.hidden_size}, {target.dtype})"
    print("(a) forward latency ...", file=sys.stderr, flush=True)
    forward = bench_forward(target, args)
    print("(b) vanilla decoding ...", file=sys.stderr, flush=True)
    vanilla = bench_vanilla(target, args)
    variants = []
    if not args.no_variants:
        print("(c) variants ...", file=sys.stderr, flush=True)
        variants = bench_variants(target, args)
    info["load_average_1min_end"] = loadavg()
    print_report(info, forward, vanilla, variants, args)
    if args.json:
        Path(args.json).write_text(json.dumps(
            {"info": info, "forward": forward, "vanilla": vanilla, "variants": variants}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
