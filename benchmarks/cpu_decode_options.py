"""Vanilla decoding speed of the default target on a CPU under runtime options: prepacked or
plain linear layers, one or two torch threads, ``OMP_WAIT_POLICY=ACTIVE``, ``torch.compile``.

    python benchmarks/cpu_decode_options.py [--dtype bfloat16] [--max-new-tokens 64] [--json out.json]

Each option runs in its own process (thread counts and OpenMP settings are per process):
one warm-up generation, then the median decode rate (new tokens / decode time, prefill
excluded) of three generations of the same chat prompt, and whether its token ids equal the
first option's. Run it on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

PROMPT = "Write a short story about a robot who learns to paint."

#: name -> (load_target pack_weights, threads, extra environment, compile)
OPTIONS = {
    "packed (default), 2 threads": (None, 2, {}, False),
    "plain nn.Linear, 2 threads": (False, 2, {}, False),
    "packed, 1 thread": (None, 1, {}, False),
    "packed, OMP_WAIT_POLICY=ACTIVE": (None, 2, {"OMP_WAIT_POLICY": "ACTIVE"}, False),
    "torch.compile (inductor), static cache": (None, 2, {}, True),
}


def child(args) -> None:
    import torch

    from prism_spec.runtime import DecodeOptions, GenerationConfig, generate
    from prism_spec.targets import load_target

    pack, threads, _, compiled = OPTIONS[args.child]
    torch.set_num_threads(threads)
    target = load_target("smollm2-135m", dtype=args.dtype, pack_weights=pack)
    ids = target.encode_prompt(PROMPT)
    cfg, options = GenerationConfig(max_new_tokens=args.max_new_tokens), DecodeOptions(static_cache=compiled)
    if compiled:
        target.compile_decoder()
    generate(target, ids, None, cfg, options)  # warm-up (and, compiled, the compilation)
    rates, tokens = [], None
    for _ in range(3):
        result = generate(target, ids, None, cfg, options)
        tokens = result.token_ids
        rates.append(len(tokens) / (result.total_s - result.prefill_s))
    print(json.dumps({"tokens_per_s": statistics.median(rates), "token_ids": tokens,
                      "packed": target.packed_weights, "threads": torch.get_num_threads()}))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--json", help="also write the rows here")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(args)
        return 0
    rows, reference = [], None
    print(f"# vanilla decoding, default target, {args.dtype}, {args.max_new_tokens} new tokens, "
          f"{datetime.date.today()}\n\n| option | tokens/s | same tokens as the first row |\n|---|--:|:-:|")
    for name, (_, _, env, _) in OPTIONS.items():
        out = subprocess.run(
            [sys.executable, __file__, "--child", name, "--dtype", args.dtype,
             "--max-new-tokens", str(args.max_new_tokens)],
            env={**os.environ, **env}, capture_output=True, text=True,
        )
        if out.returncode != 0:
            print(f"| {name} | failed: {out.stderr.strip().splitlines()[-1] if out.stderr else out.returncode} | |")
            continue
        row = json.loads(out.stdout.strip().splitlines()[-1])
        reference = reference or row["token_ids"]
        row.update(option=name, same_tokens=row["token_ids"] == reference)
        rows.append(row)
        print(f"| {name} | {row['tokens_per_s']:.1f} | {'yes' if row['same_tokens'] else 'no'} |", flush=True)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"date": str(datetime.date.today()), "dtype": args.dtype,
                                               "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
