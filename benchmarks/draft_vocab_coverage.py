"""How much of the target's own output a reduced draft vocabulary covers.

A feature drafter predicts over the ``draft_vocab_size`` most frequent reply tokens of its
training data (``d2t``); a token outside that set can never be drafted, so every tree path
stops at it. This splits a corpus (``prism corpus build``) the way training does (held-out by
prompt key), builds the draft vocabulary from the training replies for each size, and reports
the share of held-out reply tokens inside it, and the chance that a run of 4 consecutive
tokens lies wholly inside (what a depth-4 chain of accepted drafts needs). A bigger vocabulary
costs the drafter's head: ``size x hidden`` multiply-adds per drafted token.

    python benchmarks/draft_vocab_coverage.py --corpus results/smollm2-135m/corpus \\
        [--sizes 4096,8192,16384,32768] [--json out.json]
"""

from __future__ import annotations

import argparse

import numpy as np

from common import write_rows
from prism_spec.train.corpus.read import read_corpus
from prism_spec.train.mix import split_heldout
from prism_spec.train.vocab import count_tokens, draft_vocab_from_counts


def runs_inside(ids: np.ndarray, inside: np.ndarray, length: int) -> float:
    """Share of windows of ``length`` consecutive tokens (within one reply) wholly inside."""
    hits = total = 0
    for reply in ids:
        flags = inside[reply]
        if flags.size < length:
            continue
        window = np.convolve(flags.astype(np.int64), np.ones(length, dtype=np.int64), mode="valid")
        hits += int((window == length).sum())
        total += window.size
    return hits / max(total, 1)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", required=True)
    parser.add_argument("--sizes", default="2048,4096,8192,12288,16384,24576,32768")
    parser.add_argument("--holdout", type=float, default=0.05, help="held-out share of the prompts (by key)")
    parser.add_argument("--vocab-size", type=int, default=49152, help="the target's vocabulary size")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    examples = read_corpus(args.corpus)
    train, held = split_heldout(examples, args.holdout, seed=0)
    counts = count_tokens(({"input_ids": e.reply_ids} for e in train), args.vocab_size)
    held_ids = [np.asarray(e.reply_ids, dtype=np.int64) for e in held]
    flat = np.concatenate(held_ids)
    print(f"{len(train)} training replies ({int(counts.sum())} tokens, {int((counts > 0).sum())} distinct), "
          f"{len(held)} held out ({flat.size} tokens)")
    rows = []
    for size in (int(s) for s in args.sizes.split(",")):
        inside = np.zeros(args.vocab_size, dtype=bool)
        inside[draft_vocab_from_counts(counts, size).numpy()] = True
        row = {"draft_vocab_size": size, "held_out_token_coverage": round(float(inside[flat].mean()), 4),
               "runs_of_4_inside": round(runs_inside(held_ids, inside, 4), 4)}
        rows.append(row)
        print(f"{size:>6}: {row['held_out_token_coverage']:.2%} of held-out reply tokens, "
              f"{row['runs_of_4_inside']:.2%} of 4-token runs wholly inside")
    write_rows(args.json, {k: v for k, v in vars(args).items() if k != "json"}, rows)


if __name__ == "__main__":
    main()
