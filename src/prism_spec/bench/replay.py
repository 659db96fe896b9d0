"""Acceptance length replayed from the target's own continuation of each prompt, without verifying trees.

At temperature 0 speculative decoding commits exactly the target's greedy continuation, so
which drafted nodes a round accepts is decided by that continuation alone: a node is accepted
when its path from the root spells the next greedy tokens. A replay therefore needs the target
once per prompt (its greedy continuation, and one forward over prompt + continuation for the
features the drafter reads) and, per round, only the drafter's own calls (``begin``,
``draft_tree``, ``extend``, as the decode loop makes them), not the verification forward over
each tree that dominates a CPU round. The continuation is shared by every drafter and every
campaign level evaluated on the same prompts.

At T > 0 the same walk over a continuation *sampled* from the target gives acceptance with the
decode loop's distribution. The runtime's rule (``runtime.verify.verify_sampling``: a node's
children tried in turn, each kept with its probability under the residual) commits at every
node a token distributed as the target's p there, and descends exactly when that token is one
of the node's children (siblings are distinct tokens). So a decode commits a sample of the
target, and its accepted counts are a function of the trees and that sample; the trees are a
function of the committed prefix. Replaying vanilla samples therefore draws (output, accepted
counts) from the same joint distribution as decoding, and every drafter is measured on the
same sampled outputs: paired, so their differences carry less noise than separate decodes'.

The features come from one forward over the whole sequence instead of the prefill and the
verification forwards: equal in exact arithmetic, so the accepted counts equal the decode
loop's (tested in float64); in float32 or bf16 their last bits can differ, which can move a
near-tie in the drafter's ranking. The decode loop itself (``prism bench``) stays the measure
of record; a replay is the cheap way to follow acceptance across many drafters.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from typing import Sequence

import torch

from ..drafters.base import Drafter
from ..runtime import DecodeOptions, GenerationConfig, SamplingConfig, TreeConfig
from ..runtime.decode import checked_prompts, stream_generate_batch
from ..runtime.tree import draft_tree
from ..runtime.verify import greedy_path
from ..targets.hf import Target
from .runs import append_run, read_runs


@dataclass
class Continuation:
    """The target's continuation of a prompt (greedy, or sampled): ``tokens`` runs ``lookahead``
    tokens past what vanilla decoding commits (``committed``: up to the first EOS, or
    ``max_new_tokens``), since a round may accept drafts beyond the end before the output is
    cut there."""

    tokens: list[int]
    committed: int


def vanilla_continuation(target: Target, prompt_ids: Sequence[int] | torch.Tensor, max_new_tokens: int,
                         lookahead: int, sampling: SamplingConfig | None = None,
                         seed: int | None = None) -> Continuation:
    """Vanilla decoding through the runtime (greedy, or ``sampling`` from ``seed``), not
    stopping at EOS, until ``lookahead`` tokens past the committed output."""
    sampling = sampling or SamplingConfig()
    if not sampling.greedy and seed is None:
        raise ValueError("a sampled continuation needs a seed, so that it can be drawn again")
    eos = target.eos_token_ids
    config = GenerationConfig(max_new_tokens=max_new_tokens + lookahead, stop_on_eos=False, sampling=sampling,
                              seed=seed)
    tokens: list[int] = []
    committed = None
    stream = stream_generate_batch(target, [prompt_ids], None, config, DecodeOptions())
    for item in stream:
        if isinstance(item, list):
            break
        tokens.extend(item[1])
        if committed is None:
            hit = next((i for i, t in enumerate(tokens) if t in eos), None)
            if hit is not None and hit < max_new_tokens:
                committed = hit + 1
            elif len(tokens) >= max_new_tokens:
                committed = max_new_tokens
        if committed is not None and len(tokens) >= committed + lookahead:
            break
    stream.close()
    if committed is None:
        committed = min(len(tokens), max_new_tokens)
    return Continuation(tokens[: committed + lookahead], committed)


def replay_features(target: Target, drafter: Drafter, prompt: torch.Tensor,
                    continuation: Continuation) -> torch.Tensor | None:
    """What ``drafter`` reads of the target at every position of prompt + continuation (its
    features or intermediate layers; None for drafters that read none): one forward, which
    every drafter with the same ``feature_layers`` can share."""
    spec = drafter.feature_layers
    if spec is None:
        return None
    layers = spec if isinstance(spec, tuple) else None
    device = target.device
    full = torch.cat([prompt.to(device), torch.tensor(continuation.tokens, dtype=torch.long, device=device)])[None]
    kv = target.new_kv(1, None)
    with torch.inference_mode():
        out = target.forward(full, torch.arange(full.shape[1], device=device)[None], kv.cache, None, kv.lengths,
                             feature_layers=layers, logits=False, features=True)
    kv.release()
    return (out.layer_features if layers else out.features)[0]


def replay_acceptance(target: Target, drafter: Drafter, prompt_ids: Sequence[int] | torch.Tensor,
                      continuation: Continuation, tree: TreeConfig,
                      features: torch.Tensor | None = None) -> list[int]:
    """Drafted tokens accepted per round when ``drafter`` decodes ``prompt_ids`` with ``tree``
    and commits ``continuation`` (at T=0 the greedy one, which it always commits): the decode
    loop's rounds, each tree walked along the continuation (a node is accepted when its path
    spells the next committed tokens). ``features``: :func:`replay_features`, when already computed."""
    prompt = checked_prompts(target, [prompt_ids])[0]
    cont = continuation.tokens
    # A round that accepts the whole depth reads the committed token after its deepest node.
    if len(cont) < continuation.committed + tree.max_depth + 1:
        raise ValueError(f"the continuation needs {tree.max_depth + 1} tokens past the output "
                         f"(a lookahead of the tree's depth + 1), has {len(cont) - continuation.committed}")
    drafter.check_target(target)
    device = target.device
    if features is None:
        features = replay_features(target, drafter, prompt, continuation)
    n_prompt = prompt.numel()
    committed_tokens = torch.tensor(cont, dtype=torch.long, device=device)

    def feats(start: int, stop: int):
        return None if features is None else features[start:stop]

    with torch.inference_mode():
        drafter.use_static_cache(None)
        root_logits = drafter.begin([prompt], [cont[0]], [feats(0, n_prompt)])
        pos, committed, accepted = 0, 1, []  # pos: index in cont of the round's root token
        while committed < continuation.committed:
            shape = tree.fitting(target.max_context - (n_prompt + pos) - 1)
            trees = draft_tree(drafter, torch.tensor([cont[pos]], device=device), root_logits, shape)
            drafter.end_round()
            row = trees.row(0)
            # The committed token after each node, were the node on the committed path (the
            # walk only reads it at nodes whose ancestors all are).
            path, bonus = greedy_path(row, committed_tokens[pos + 1 + row.depths])
            k = len(path) - 1
            accepted.append(k)
            new = torch.tensor(cont[pos + 1: pos + k + 1] + [bonus], dtype=torch.long, device=device)
            root_logits = drafter.extend([new], [feats(n_prompt + pos, n_prompt + pos + k + 1)])
            pos += k + 1
            committed += k + 1
    return accepted


# ----------------------------------------------------------------------------- benchmarks
class ContinuationStore:
    """The target's continuations of benchmark turns (greedy, or sampled with ``sampling``),
    kept in a JSONL file (one line per continuation, appended as each is computed) so that
    every drafter and every later evaluation on the same prompts reuses them: vanilla decoding
    of the prompts is paid once. A continuation is keyed by its prompt's token ids and what
    decides it (target, dtype, device kind, max_new_tokens; when sampling, the sampling settings
    and ``seed``, from which each prompt's own seed is derived); one with enough lookahead
    serves any tree. Read and written like a bench's runs file (``bench.runs``): a line cut
    short by a crash is computed again."""

    def __init__(self, path: str | os.PathLike | None, target: Target, lookahead: int,
                 sampling: SamplingConfig | None = None, seed: int = 0):
        self.path, self.target, self.lookahead = path, target, lookahead
        self.sampling = sampling or SamplingConfig()
        # A line cut short by a crash is cut from the file, so appends start on a clean line.
        self.items = {item["key"]: item for item in read_runs(path, repair=True)} if path else {}
        param = next(target.model.parameters())
        self.salt = f"{target.name}|{param.dtype}|{param.device.type}"
        if not self.sampling.greedy:  # greedy keys stay as they were before sampling existed
            s = self.sampling
            self.salt += f"|T={s.temperature}|top_p={s.top_p}|top_k={s.top_k}|seed={seed}"
        self.computed = 0

    def get(self, prompt_ids: list[int], max_new_tokens: int) -> Continuation:
        key = hashlib.sha256(f"{self.salt}|{max_new_tokens}|{prompt_ids}".encode()).hexdigest()[:32]
        item = self.items.get(key)
        if item is None or len(item["tokens"]) - item["committed"] < self.lookahead:
            # Each prompt its own seed (from the key): prompts sample independently, reproducibly.
            seed = None if self.sampling.greedy else int(key[:15], 16)
            cont = vanilla_continuation(self.target, prompt_ids, max_new_tokens, self.lookahead, self.sampling, seed)
            if item is not None and cont.tokens[: len(item["tokens"])] != item["tokens"]:
                raise ValueError(f"{self.path}: a longer continuation of a stored one differs from it "
                                 "(another torch build or machine?): use another store file")
            item = {"key": key, "tokens": cont.tokens, "committed": cont.committed}
            self.items[key] = item
            self.computed += 1
            if self.path:
                with open(self.path, "a") as f:  # a later line for the same key wins on reading
                    append_run(f, item)
        return Continuation(item["tokens"], item["committed"])


def replay_benchmarks(target: Target, drafters: dict[str, Drafter], benchmarks, tree: TreeConfig,
                      store: ContinuationStore, progress: bool = True) -> dict[str, dict]:
    """T=0 acceptance of each drafter on every turn of ``benchmarks`` (``prism bench``'s
    prompts: MT-bench's second turn after the target's own first answer), pooled per benchmark
    as ``prism bench`` pools it. Returns {drafter: {"per_benchmark": {name: AL}, "mean": AL,
    "rounds": n}}."""
    from tqdm.auto import tqdm

    from .datasets import conversation_prompt
    from .metrics import acceptance_length

    turns_of: dict[str, dict[str, list]] = {name: {} for name in drafters}
    jobs = [(b, q) for b in benchmarks for q in b.questions]
    for bench, question in tqdm(jobs, desc="replay", disable=not progress):
        answers: list[str] = []
        for i in range(len(question.turns)):
            prompt = conversation_prompt(target, question.turns[: i + 1], answers)
            cont = store.get(list(prompt), bench.max_new_tokens)
            features: dict = {}  # one target forward per kind of input the drafters read
            for name, drafter in drafters.items():
                spec = drafter.feature_layers
                if spec not in features:
                    features[spec] = replay_features(target, drafter, torch.as_tensor(prompt), cont)
                accepted = replay_acceptance(target, drafter, prompt, cont, tree, features[spec])
                turns_of[name].setdefault(bench.name, []).append({"accepted": accepted})
            answers.append(target.decode(cont.tokens[: cont.committed]).strip())
    out = {}
    for name, per_bench in turns_of.items():
        als = {b: acceptance_length(turns) for b, turns in per_bench.items()}
        valid = [v for v in als.values() if v is not None]
        out[name] = {"per_benchmark": als, "mean": sum(valid) / len(valid) if valid else None,
                     "rounds": sum(len(t["accepted"]) for turns in per_bench.values() for t in turns)}
    return out
