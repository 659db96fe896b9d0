"""Scale of the target's hidden states that feature drafters read: the RMS of each PRISM*
input layer (raw residual stream) against the last hidden state after the final norm.

    python benchmarks/hidden_state_scale.py [--target smollm2-135m] [--json out.json]

Why PRISM* normalises its input layers (``drafter.input_norm``, docs/training.md): raw
residual-stream states carry massive activations, largest on the first token.
"""

from __future__ import annotations

import argparse
import datetime
import json
from pathlib import Path

import torch

from prism_spec.targets import default_feature_layers, load_target

PROMPT = "Explain how a refrigerator keeps food cold, step by step. Then write a poem about it."


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", default="smollm2-135m")
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    target = load_target(args.target, dtype="float32", pack_weights=False)
    ids = torch.tensor([target.encode_prompt(PROMPT)])
    with torch.inference_mode():
        states = target.model(ids, output_hidden_states=True).hidden_states
    layers = list(default_feature_layers(target.num_layers)) + [len(states) - 1]
    print(f"# hidden-state scale, {args.target}, one {ids.shape[1]}-token chat prompt, {datetime.date.today()}\n")
    print("| HF hidden_states index | what | RMS, first token | RMS, other tokens | max abs, other tokens |")
    print("|--:|---|--:|--:|--:|")
    rows = []
    for i in layers:
        h = states[i][0].float()
        row = {"index": i, "what": "last, after the final norm" if i == len(states) - 1 else "raw residual stream",
               "rms_first": h[0].pow(2).mean().sqrt().item(), "rms_rest": h[1:].pow(2).mean().sqrt().item(),
               "max_abs_rest": h[1:].abs().max().item(), "max_abs_all": h.abs().max().item()}
        rows.append(row)
        print(f"| {i} | {row['what']} | {row['rms_first']:.1f} | {row['rms_rest']:.2f} | {row['max_abs_rest']:.1f} |")
    print(f"\nlargest activation anywhere: {max(r['max_abs_all'] for r in rows):.0f}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"date": str(datetime.date.today()), "target": args.target,
                                               "prompt": PROMPT, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
