"""The supported-families table: for each tiny random float64 model of the test suite's family
matrix (``tests/helpers.py`` FAMILIES), what the runtime does with it, checked live.

    python benchmarks/family_matrix.py [--markdown docs/families.md]

Columns: how the family is served (sliding windows, attention implementation, logit
transform, the drafter modules' layer), and whether greedy decoding (24 new tokens, 3
prompts, T=0) equals the model's own ``generate``: vanilla, speculative with a 1-layer standard
drafter and with an untrained PRISM drafter, single and batched, dynamic and static cache.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import sys
from pathlib import Path

import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from helpers import FAMILIES, tiny_family  # noqa: E402  (the suite's own configs)

from prism_spec.drafters import FeatureDrafter, FeatureDrafterModel, StandardDrafter, prism_config  # noqa: E402
from prism_spec.runtime import DecodeOptions, GenerationConfig, TreeConfig, generate, generate_batch  # noqa: E402

PROMPTS = [[5, 17, 33, 2, 9, 41, 60, 11, 3, 7, 21, 19], [5, 17, 33, 2, 9, 41, 60], [8, 8, 30, 1, 2, 3, 4, 5, 6, 7]]
MAX_NEW = 24
MARK_START, MARK_END = "<!-- family-matrix:start -->", "<!-- family-matrix:end -->"


def check(name: str) -> dict:
    target = tiny_family(name)
    family = target.family
    reference = [
        target.model.generate(torch.tensor([p]), max_new_tokens=MAX_NEW, min_new_tokens=MAX_NEW, do_sample=False)[
            0, len(p):].tolist()
        for p in PROMPTS
    ]
    config = GenerationConfig(max_new_tokens=MAX_NEW, stop_on_eos=False)
    options = DecodeOptions(TreeConfig(depth=3, top_k=3, total_tokens=8))
    static = dataclasses.replace(options, static_cache=True)
    torch.manual_seed(0)
    drafters = {"vanilla": None, "standard": StandardDrafter.from_target_layers(target, 1),
                "prism": FeatureDrafter(FeatureDrafterModel(prism_config(target), target))}
    results = {}
    for label, drafter in drafters.items():
        single = [generate(target, p, drafter, config, options).token_ids for p in PROMPTS]
        batched = [r.token_ids for r in generate_batch(target, PROMPTS, drafter, config, options)]
        in_static = [r.token_ids for r in generate_batch(target, PROMPTS, drafter, config, static)]
        results[label] = single == reference and batched == reference and in_static == reference
    windows = sorted({w for w in family.windows if w is not None})
    transforms = [t for t, on in (("soft-cap", family.logit_softcap), ("scale", family.logit_scale),
                                  ("divide", family.logit_divisor), ("embed scale", family.embed_scale)) if on]
    return {
        "config": name,
        "model_type": family.model_type,
        "sliding": (f"window {windows[0]}, " + ("per layer type" if family.mask_types else "every layer")) if windows else "-",
        "attention": target.config._attn_implementation,
        "transforms": ", ".join(transforms) or "-",
        "drafter_layer": "own" if family.native_drafter_layer else "Llama",
        **{label: "yes" if ok else "NO" for label, ok in results.items()},
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--markdown", help="also write the table into this file, between its family-matrix markers")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    rows = []
    for name in FAMILIES:
        rows.append(check(name))
        print(rows[-1], flush=True)
    header = ["config", "model_type", "sliding", "attention", "transforms", "drafter_layer", "vanilla", "standard", "prism"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(row[h]) for h in header) + " |" for row in rows]
    table = "\n".join(lines)
    print(f"\n{table}")
    if args.markdown:
        stamp = (f"Generated {datetime.date.today()} by `python benchmarks/family_matrix.py --markdown {args.markdown}` "
                 f"(transformers {transformers.__version__}, torch {torch.__version__}).")
        path = Path(args.markdown)
        text = path.read_text()
        start, end = text.index(MARK_START) + len(MARK_START), text.index(MARK_END)
        path.write_text(f"{text[:start]}\n{stamp}\n\n{table}\n{text[end:]}")
        print(f"wrote {args.markdown}")
    return 0 if all(row[k] == "yes" for row in rows for k in ("vanilla", "standard", "prism")) else 1


if __name__ == "__main__":
    raise SystemExit(main())
