"""One linear layer at decode sizes: ``F.linear`` against the oneDNN-prepacked weight that
``PackedLinear`` uses (see docs/performance.md, "Prepacked CPU weights").

    python benchmarks/linear_packing.py [--threads 2] [--json out.json]

Each cell runs ``copies`` different weights of the shape in turn (30 for the layer shapes,
so they come from memory as in a 30-layer forward, not from cache) and reports microseconds
per product, best of 3 repeats. Also prints the largest difference between the two outputs.
Run it on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from prism_spec.bench.machine import cpu_name
from prism_spec.targets.packed import packed_linear, packed_linear_available

# (out, in, copies): SmolLM2-135M's projections, its reduced draft head and its LM head.
SHAPES = ((576, 576, 30), (192, 576, 30), (1536, 576, 30), (576, 1536, 30), (16384, 576, 2), (49152, 576, 1))
ROWS = (1, 3, 8, 48)


def per_call_us(fn, copies: int, calls: int = 100, repeats: int = 3) -> float:
    for _ in range(5):
        fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - start) / calls / copies * 1e6)
    return best


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--dtypes", default="bfloat16,float32")
    parser.add_argument("--json", help="also write the rows here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = []
    print(f"# F.linear vs prepacked, {args.threads} threads, {cpu_name()}, torch {torch.__version__}, "
          f"{datetime.date.today()}\n")
    print("| weight | dtype | rows | F.linear µs | packed µs | ratio | max abs diff |\n|---|---|--:|--:|--:|--:|--:|")
    torch.manual_seed(0)
    for dtype in (getattr(torch, d) for d in args.dtypes.split(",")):
        if not packed_linear_available(dtype):
            print(f"(no packed linear for {dtype} in this torch build)")
            continue
        for out_f, in_f, copies in SHAPES:
            weights = [torch.randn(out_f, in_f, dtype=dtype) * 0.02 for _ in range(copies)]
            layers = [packed_linear(w) for w in weights]
            for n in ROWS:
                x = torch.randn(1, n, in_f, dtype=dtype)
                with torch.inference_mode():
                    plain = per_call_us(lambda: [F.linear(x, w) for w in weights], copies)
                    packed = per_call_us(lambda: [layer(x) for layer in layers], copies)
                    diff = (layers[0](x).float() - F.linear(x, weights[0]).float()).abs().max().item()
                row = {"out": out_f, "in": in_f, "dtype": str(dtype).replace("torch.", ""), "rows": n,
                       "f_linear_us": plain, "packed_us": packed, "max_abs_diff": diff}
                rows.append(row)
                print(f"| {out_f} x {in_f} | {row['dtype']} | {n} | {plain:.1f} | {packed:.1f} | "
                      f"{plain / packed:.2f} | {diff:.2g} |", flush=True)
    if args.json:
        record = {"date": str(datetime.date.today()), "cpu": cpu_name(), "platform": platform.platform(),
                  "torch": torch.__version__, "threads": args.threads, "rows": rows}
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(record, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
