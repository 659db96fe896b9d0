"""The methods a bench compares, by a short spec string.

``KIND[@LABEL][=ARG]`` -- the label (default: the kind) names the method in tables; give one
when the same kind appears twice (``--method prism@p25=runs/p25 --method prism@p50=runs/p50``).

=============  =====================================================================
vanilla        the decode loop with no drafter: one target forward per token
standard=X     independent small LM: a drafter folder, or ``layers:N`` for the
               target's first N layers + its head (StandardDrafter.from_target_layers)
eagle2=DIR     EAGLE-2 drafter folder (load_drafter)
hass=DIR       HASS drafter folder (same architecture as EAGLE-2, other training)
prism=DIR      PRISM drafter folder
prism*=DIR     PRISM with multi-layer target features
hf-assisted=X  transformers ``generate(assistant_model=...)`` with the standard drafter's
               model (folder or ``layers:N``); its own candidate schedule
hf-lookup[=N]  transformers ``generate(prompt_lookup_num_tokens=N)`` (default 10)
llama.cpp      llama.cpp's own plain decoding (llama-cpp-python ``Llama.generate``) of a
               GGUF target on the llama.cpp engine (``--engine llama.cpp``)
=============  =====================================================================

The peers (``hf-*``, ``llama.cpp``) run their own loop: greedy at T=0, their own sampling
(temperature only, top-k/top-p/min-p off) at T>0. The ``hf-*`` AL is measured from
``generate``'s own forwards (new tokens / target forwards, counted with a forward hook);
``llama.cpp`` decodes one token per forward (AL 1). Peers have no per-round trace, so no
per-step acceptance rates and no drafting share.
"""

from __future__ import annotations

import copy
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from transformers.utils import logging as hf_logging

from ..devices import synchronize
from ..drafters.base import Drafter, registered_bench_kinds
from ..drafters.checkpoint import load_drafter
from ..drafters.standard import StandardDrafter
from ..runtime.decode import DecodeOptions, GenerationConfig, GenerationResult, generate
from ..runtime.tree import TreeConfig
from ..runtime.verify import SamplingConfig
from ..targets.hf import Target
from ..targets.packed import PackedLinear
from .metrics import kv_bytes_per_token, kv_cache_bound_bytes, peak_kv_cache_bytes


class MethodError(ValueError):
    """A bad method spec, or a drafter that does not fit the method named."""


@dataclass(frozen=True)
class KindInfo:
    needs_arg: bool
    drafter: str  # "none" | "standard" | "feature" | "peer" (its own decoding loop)
    expected_architecture: str | None  # for feature drafters: what load_drafter should return
    help: str
    multi_layer: bool | None = None  # see drafters.base.BenchKind


_VANILLA = {"vanilla": KindInfo(False, "none", None, "no drafter (the baseline every speedup divides by)")}
_PEERS = {
    "hf-assisted": KindInfo(True, "peer", None, "transformers assistant_model: drafter folder or layers:N"),
    "hf-lookup": KindInfo(False, "peer", None, "transformers prompt lookup (N candidate tokens, default 10)"),
    "llama.cpp": KindInfo(False, "peer", None, "llama.cpp's own plain decoding of the GGUF target"),
}


def method_kinds() -> dict[str, KindInfo]:
    """Every method kind a bench takes: vanilla, the bench kinds of the registered drafter
    architectures (drafters.base.register), and the peers that run their own loop."""
    drafters = {
        name: KindInfo(True, kind.trains_as, kind.architecture if kind.trains_as == "feature" else None, bench.help,
                       bench.multi_layer)
        for name, (kind, bench) in registered_bench_kinds().items()
    }
    return {**_VANILLA, **drafters, **_PEERS}


@dataclass(frozen=True)
class MethodSpec:
    kind: str
    arg: str | None = None
    label: str | None = None
    tree: TreeConfig | None = None  # overrides the bench's tree (tree sweeps)
    extra: tuple[tuple[str, object], ...] = ()  # recorded with each run (e.g. data_fraction)

    def __post_init__(self):
        kinds = method_kinds()
        if self.kind not in kinds:
            raise MethodError(f"unknown method {self.kind!r}: choose from {', '.join(kinds)}")
        info = kinds[self.kind]
        if info.needs_arg and not self.arg:
            raise MethodError(f"method {self.kind} needs an argument: {self.kind}=<{info.help}>")
        if self.kind in ("vanilla", "llama.cpp") and self.arg:
            raise MethodError(f"{self.kind} takes no argument")

    @property
    def name(self) -> str:
        return self.label or self.kind

    @property
    def is_peer(self) -> bool:
        """Runs another project's decoding loop (transformers, llama.cpp): no tree, no drafter here."""
        return method_kinds()[self.kind].drafter == "peer"

    @property
    def is_vanilla(self) -> bool:
        return self.kind == "vanilla"

    def spec_string(self) -> str:
        s = self.kind + (f"@{self.label}" if self.label else "")
        return s + (f"={self.arg}" if self.arg else "")

    @classmethod
    def parse(cls, spec: str) -> "MethodSpec":
        head, sep, arg = spec.partition("=")
        kind, _, label = head.partition("@")
        kind, label = kind.strip(), label.strip() or None
        if sep and not arg:
            raise MethodError(f"bad method spec {spec!r}: empty argument after '='")
        return cls(kind, arg or None, label)


def parse_methods(specs) -> list[MethodSpec]:
    methods = [s if isinstance(s, MethodSpec) else MethodSpec.parse(s) for s in specs]
    names = [m.name for m in methods]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise MethodError(
            f"method name(s) {', '.join(dupes)} used twice: give each a label, e.g. prism@p25=DIR"
        )
    return methods


def _layers_arg(arg: str) -> int | None:
    if arg.startswith("layers:"):
        try:
            return int(arg.split(":", 1)[1])
        except ValueError:
            raise MethodError(f"bad {arg!r}: use layers:N") from None
    return None


def _standard_drafter(arg: str, target: Target) -> StandardDrafter:
    n = _layers_arg(arg)
    if n is not None:
        return StandardDrafter.from_target_layers(target, n)
    if not Path(arg).is_dir():
        raise MethodError(f"standard drafter {arg!r} is neither layers:N nor a folder")
    drafter = load_drafter(arg, target)
    if not isinstance(drafter, StandardDrafter):
        raise MethodError(f"{arg} holds a {getattr(drafter, 'method', '?')} drafter, not a standard one")
    return drafter


def _unique_param_bytes(modules, seen: set | None = None) -> int:
    """Bytes of the parameters and buffers (shared / tied tensors once), plus the copies
    derived from them: prepacked CPU weights and a reduced-vocabulary drafter's head slice."""
    seen = set() if seen is None else seen
    total = 0
    for module in modules:
        if module is None:
            continue
        for t in list(module.parameters()) + list(module.buffers()):
            key = (t.data_ptr(), t.numel(), t.dtype)  # shared / tied tensors count once
            if key in seen:
                continue
            seen.add(key)
            total += t.numel() * t.element_size()
        for sub in module.modules():
            if isinstance(sub, PackedLinear) and sub.packable:
                key = ("packed", sub.weight.data_ptr(), sub.weight.numel())
                if key not in seen:  # about the weight's size in oneDNN's layout
                    seen.add(key)
                    total += sub.weight.numel() * sub.weight.element_size()
        derived = getattr(module, "derived_weight_bytes", None)
        if callable(derived):
            total += derived()
    return total


@dataclass
class LoadedMethod:
    """A method ready to run: ``run_turn(prompt_ids, max_new_tokens, temperature, seed, tree)``
    returns a turn trace (see :mod:`prism_spec.bench.metrics`)."""

    spec: MethodSpec
    target: Target
    drafter: Drafter | None = None
    weights_bytes: int = 0
    info: dict = field(default_factory=dict)  # recorded with each run
    static_cache: bool = False  # see DecodeOptions.static_cache
    _hf_model: object = None
    _hf_assistant_gc: object = None
    _llama: object = None  # llama-cpp-python Llama for the llama.cpp peer

    @property
    def name(self) -> str:
        return self.spec.name

    # ------------------------------------------------------------------ our decode loop
    def _kv(self, result: GenerationResult, tree: TreeConfig) -> int:
        t = self.target
        t_bpt = kv_bytes_per_token(t.config, dtype_bytes=_kv_dtype_bytes(t))
        d = self.drafter
        if d is None:
            return peak_kv_cache_bytes(result.prompt_len, result.accepted, result.tree_sizes, t_bpt)
        tree_tokens = tree.depth * min(tree.top_k, t.vocab_size) if tree.total_tokens > 1 else 0
        if isinstance(d, StandardDrafter):
            d_bpt = kv_bytes_per_token(d.lm.config, dtype_bytes=d.lm.dtype.itemsize)
            offset = 1
        elif hasattr(d, "config") and hasattr(d.config, "layers_per_module"):
            d_bpt = kv_bytes_per_token(t.config, num_layers=d.config.layers_per_module, dtype_bytes=t.dtype.itemsize)
            offset = 0
        else:  # unknown drafter: count the target only
            d_bpt, offset = 0, 0
        return peak_kv_cache_bytes(
            result.prompt_len, result.accepted, result.tree_sizes, t_bpt, d_bpt, offset, tree_tokens
        )

    def run_turn(self, prompt_ids, max_new_tokens: int, temperature: float, seed: int, tree: TreeConfig) -> dict:
        if self.spec.kind == "llama.cpp":
            return self._run_llama_cpp(prompt_ids, max_new_tokens, temperature, seed)
        if self.spec.is_peer:
            return self._run_hf(prompt_ids, max_new_tokens, temperature, seed)
        tree = self.spec.tree or tree
        cfg = GenerationConfig(max_new_tokens=max_new_tokens, sampling=SamplingConfig(temperature=temperature), seed=seed)
        r = generate(self.target, prompt_ids, self.drafter, cfg, DecodeOptions(tree, self.static_cache))
        return {
            "prompt_len": r.prompt_len,
            "new_tokens": len(r.token_ids),
            "token_ids": list(r.token_ids),
            "text": r.text,
            "finish_reason": r.finish_reason,
            "accepted": list(r.accepted),
            "exhausted": list(r.exhausted),
            "tree_sizes": list(r.tree_sizes),
            "tree_depths": list(r.tree_depths),
            "rounds": r.rounds,
            "accepted_total": int(sum(r.accepted)),
            "al_source": "decode",
            "prefill_s": r.prefill_s,
            "draft_s": r.draft_s,
            "verify_s": r.verify_s,
            "total_s": r.total_s,
            "kv_peak_bytes": self._kv(r, tree),
            "kv_method": "replay",
        }

    # ------------------------------------------------------------------ peers
    def _run_llama_cpp(self, prompt_ids, max_new_tokens: int, temperature: float, seed: int) -> dict:
        from ..targets.llamacpp import plain_generate

        t = self.target
        start = time.perf_counter()
        ids = plain_generate(self._llama, prompt_ids, max_new_tokens, t.eos_token_ids, temperature, seed)
        total = time.perf_counter() - start
        t_bpt = kv_bytes_per_token(t.config, dtype_bytes=_kv_dtype_bytes(t))
        return {
            "prompt_len": len(prompt_ids),
            "new_tokens": len(ids),
            "token_ids": ids,
            "text": t.decode(ids),
            "finish_reason": "eos" if ids and ids[-1] in t.eos_token_ids else "length",
            "accepted": None,
            "exhausted": None,
            "tree_sizes": None,
            "tree_depths": None,
            "rounds": len(ids),
            "accepted_total": 0,
            "al_source": "one-token-steps",
            "prefill_s": None,
            "draft_s": None,
            "verify_s": None,
            "total_s": total,
            "kv_peak_bytes": kv_cache_bound_bytes(len(prompt_ids), len(ids), 0, t_bpt, 0),
            "kv_method": "bound",
        }

    def _run_hf(self, prompt_ids, max_new_tokens: int, temperature: float, seed: int) -> dict:
        t = self.target
        x = torch.as_tensor(list(prompt_ids), dtype=torch.long, device=t.device)[None]
        eos = sorted(t.eos_token_ids)
        pad = getattr(t.tokenizer, "pad_token_id", None) if t.tokenizer is not None else None
        kwargs = dict(
            attention_mask=torch.ones_like(x),
            max_new_tokens=max_new_tokens,
            eos_token_id=eos or None,
            pad_token_id=pad if pad is not None else (eos[0] if eos else 0),
        )
        if temperature > 0:
            kwargs.update(do_sample=True, temperature=temperature, top_k=0, top_p=1.0)
        else:
            kwargs.update(do_sample=False)
        if self.spec.kind == "hf-assisted":
            # The assistant's schedule state (confidence threshold, ...) persists across calls
            # in transformers; restore it so every run starts from the same settings.
            self._hf_model.generation_config = copy.deepcopy(self._hf_assistant_gc)
            kwargs["assistant_model"] = self._hf_model
            lookahead = int(self.info["num_assistant_tokens"])
        else:
            kwargs["prompt_lookup_num_tokens"] = self.info["prompt_lookup_num_tokens"]
            lookahead = self.info["prompt_lookup_num_tokens"]
        forwards = [0]
        hook = t.model.register_forward_pre_hook(lambda *_: forwards.__setitem__(0, forwards[0] + 1))
        torch.manual_seed(seed)
        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()  # generate's deprecation chatter, once per call
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                synchronize(t.device)
                start = time.perf_counter()
                out = t.model.generate(x, **kwargs)
                synchronize(t.device)
                total = time.perf_counter() - start
        finally:
            hook.remove()
            hf_logging.set_verbosity(verbosity)
        ids = out[0, x.shape[1]:].tolist()
        finish = "length"
        for i, tok in enumerate(ids):
            if tok in t.eos_token_ids:
                ids, finish = ids[: i + 1], "eos"
                break
        rounds = forwards[0]
        t_bpt = kv_bytes_per_token(t.config, dtype_bytes=t.dtype.itemsize)
        d_bpt = 0
        if self.spec.kind == "hf-assisted":
            d_bpt = kv_bytes_per_token(self._hf_model.config, dtype_bytes=t.dtype.itemsize)
        return {
            "prompt_len": int(x.shape[1]),
            "new_tokens": len(ids),
            "token_ids": ids,
            "text": t.decode(ids) if t.tokenizer is not None else None,
            "finish_reason": finish,
            "accepted": None,
            "exhausted": None,
            "tree_sizes": None,
            "tree_depths": None,
            "rounds": rounds,
            "accepted_total": max(len(ids) - rounds, 0),
            "al_source": "hf-forwards",
            "prefill_s": None,
            "draft_s": None,
            "verify_s": None,
            "total_s": total,
            "kv_peak_bytes": kv_cache_bound_bytes(x.shape[1], len(ids), lookahead, t_bpt, d_bpt),
            "kv_method": "bound",
        }


#: transformers' defaults for assisted generation (used when the assistant's config leaves them unset).
_HF_ASSISTANT_DEFAULTS = {
    "num_assistant_tokens": 20,
    "num_assistant_tokens_schedule": "constant",
    "assistant_confidence_threshold": 0.4,
}


def _kv_dtype_bytes(target: Target) -> int:
    """Bytes per KV-cache element: llama.cpp keeps its cache in float16 whatever the weights."""
    return 2 if getattr(target, "engine", "torch") == "llama.cpp" else target.dtype.itemsize


def _check_architecture(spec: MethodSpec, drafter: Drafter) -> None:
    info = method_kinds()[spec.kind]
    got = getattr(getattr(drafter, "config", None), "architecture", getattr(drafter, "method", None))
    multi = bool(getattr(getattr(drafter, "config", None), "input_layers", None))
    problems = []
    if info.expected_architecture and got != info.expected_architecture:
        problems.append(f"its architecture is {got!r}, {spec.kind} drafters are {info.expected_architecture!r}")
    if info.multi_layer is True and not multi:
        problems.append(f"it reads only the last hidden state ({spec.kind} uses multi-layer features)")
    if info.multi_layer is False and multi:
        others = [name for name, k in method_kinds().items()
                  if k.expected_architecture == info.expected_architecture and k.multi_layer]
        problems.append(f"it reads multi-layer features: that is {' or '.join(others) or 'another kind'}")
    if problems:
        warnings.warn(f"method {spec.name} ({spec.arg}): " + "; ".join(problems), stacklevel=3)


def load_method(spec: MethodSpec | str, target: Target) -> LoadedMethod:
    """Load the drafter a method needs and measure its weights."""
    spec = MethodSpec.parse(spec) if isinstance(spec, str) else spec
    kind = method_kinds()[spec.kind]
    seen: set = set()
    gguf_path = getattr(target, "gguf_path", None)
    # On the llama.cpp engine the target's weights are the GGUF file; its transformers
    # companion only lends embeddings and head rows to the drafters.
    target_bytes = Path(gguf_path).stat().st_size if gguf_path else _unique_param_bytes([target.model], seen)
    info: dict = {"kind": spec.kind, "arg": spec.arg, **dict(spec.extra)}
    drafter, hf_model, hf_gc, llama = None, None, None, None
    if kind.drafter == "standard":
        drafter = _standard_drafter(spec.arg, target)
        drafter_modules = [drafter.lm.model]
    elif kind.drafter == "feature":
        if not Path(spec.arg).is_dir():
            raise MethodError(f"{spec.kind} needs a drafter folder; {spec.arg!r} is not one")
        drafter = load_drafter(spec.arg, target)
        _check_architecture(spec, drafter)
        drafter_modules = [getattr(drafter, "model", None)]
        cfg = getattr(drafter, "config", None)
        if cfg is not None and hasattr(cfg, "to_dict"):
            info["drafter_config"] = {
                k: v for k, v in cfg.to_dict().items() if k in ("architecture", "num_modules", "layers_per_module",
                                                                 "step_mapping", "input_layers")
            }
    elif spec.kind == "hf-assisted":
        hf_model = _standard_drafter(spec.arg, target).lm.model
        hf_gc = copy.deepcopy(hf_model.generation_config)
        drafter_modules = [hf_model]
        # Unset (None) means transformers' own defaults at generate time.
        defaults = dict(_HF_ASSISTANT_DEFAULTS)
        try:  # private in transformers 5; the hard-coded values above are its 5.x defaults
            defaults.update({k: v for k, v in type(hf_gc)._get_default_generation_params().items() if k in defaults})
        except Exception:  # noqa: BLE001
            pass
        for key, default in defaults.items():
            value = getattr(hf_gc, key, None)
            info[key] = default if value is None else value
    elif spec.kind == "hf-lookup":
        try:
            n = int(spec.arg) if spec.arg else 10
        except ValueError:
            raise MethodError(f"hf-lookup takes a token count, got {spec.arg!r}") from None
        info["prompt_lookup_num_tokens"] = n
        drafter_modules = []
    elif spec.kind == "llama.cpp":
        if getattr(target, "engine", "torch") != "llama.cpp":
            raise MethodError("the llama.cpp method decodes a GGUF target with llama.cpp itself: run the bench "
                              "on the llama.cpp engine (a .gguf --target, or --engine llama.cpp)")
        from ..targets.llamacpp import plain_llama

        llama = plain_llama(target)
        info.update(gguf=Path(gguf_path).name, threads=target.threads, flash_attention=target.flash_attention,
                    kv_type=target.kv_type)
        drafter_modules = []
    else:
        drafter_modules = []
    drafter_bytes = _unique_param_bytes(drafter_modules, seen)
    info.update(target_weights_bytes=target_bytes, drafter_weights_bytes=drafter_bytes)
    return LoadedMethod(
        spec, target, drafter, target_bytes + drafter_bytes, info, _hf_model=hf_model, _hf_assistant_gc=hf_gc,
        _llama=llama,
    )


#: What the runner needs to build a method, replaceable in tests.
MethodLoader = Callable[[MethodSpec, Target], LoadedMethod]
