"""Turn a user's ``--drafter`` value into a drafter for a loaded target.

Accepted specs:

``auto``
    The best drafter available for the target: the trained PRISM drafter packaged with
    prism-spec for it (``PACKAGED_DRAFTERS``, today the default target), else an *untrained
    stand-in*: the target's own first ``STAND_IN_LAYERS`` layers (fewer for targets with at
    most that many layers) plus its final norm and head, lossless but usually too weak to give
    a speedup.
``layers:N``
    ``StandardDrafter.from_target_layers(target, N)``.
``none`` / ``vanilla``
    No drafter: vanilla decoding (the resolved drafter is ``None``).
anything else
    A drafter checkpoint folder, loaded by ``prism_spec.drafters.checkpoint.load_drafter``.

``--drafter-weights`` (``weights``) then picks float or int8 weights for the drafter
(:func:`apply_drafter_weights`).
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import NamedTuple

from ..options import DRAFTER_WEIGHTS
from .base import Drafter, follow_target_packing
from .standard import StandardDrafter

#: Depth of the untrained stand-in that ``auto`` falls back to.
STAND_IN_LAYERS = 4

#: ``auto``: target name -> folder of a packaged, trained drafter checkpoint, relative to the
#: ``prism_spec`` package. How it was trained: results/smollm2-135m/ (reproduce.sh, training log).
PACKAGED_DRAFTERS: dict[str, str] = {"smollm2-135m": "assets/drafters/smollm2-135m-prism"}

NONE_SPECS = ("none", "vanilla")


class DrafterSpecError(ValueError):
    """A ``--drafter`` value that cannot be turned into a drafter."""


class ResolvedDrafter(NamedTuple):
    drafter: Drafter | None  # None: vanilla decoding
    label: str  # human-readable description for reports
    trained: bool  # False for stand-ins built from the target's own layers


def packaged_drafter_path(target) -> Path | None:
    """Folder of a trained drafter shipped with prism-spec for ``target``, if there is one."""
    relative = PACKAGED_DRAFTERS.get(str(target.name))
    if relative is None:
        return None
    path = Path(str(resources.files("prism_spec").joinpath(relative)))
    return path if path.exists() else None


def resolve_drafter(spec: str, target, weights: str = "float") -> ResolvedDrafter:
    """Build the drafter that ``spec`` names for ``target`` (see the module docstring), its
    weights as ``weights`` says (``--drafter-weights``): ``float`` keeps them as loaded
    (prepacked on a CPU when the target's are), ``int8`` runs the drafter's own layers and head
    on int8 weights (:meth:`Drafter.use_int8_weights`), ``auto`` is int8 on the llama.cpp
    engine, where a float32 drafter step costs about half a target step and int8 measured
    faster at the same acceptance (docs/llamacpp.md), float elsewhere."""
    resolved = _resolve(spec, target)
    if resolved.drafter is not None and apply_drafter_weights(resolved.drafter, target, weights, resolved.label):
        return resolved._replace(label=f"{resolved.label}, int8 weights")
    return resolved


def wants_int8_weights(engine: str, weights: str) -> bool:
    """Whether ``--drafter-weights`` ``weights`` asks for int8 drafter weights on ``engine``."""
    if weights not in DRAFTER_WEIGHTS:
        raise DrafterSpecError(f"drafter weights {weights!r}: one of {', '.join(DRAFTER_WEIGHTS)}")
    return weights == "int8" or (weights == "auto" and engine == "llama.cpp")


def apply_drafter_weights(drafter: Drafter, target, weights: str, label: str = "this drafter",
                          strict: bool | None = None) -> bool:
    """Give ``drafter`` the weights ``--drafter-weights`` asks for (see :func:`resolve_drafter`);
    True when they are int8. An explicit ``int8`` that the drafter cannot have (a standard
    drafter sharing the target's layers, a GPU, no quantized kernels) is an error unless
    ``strict`` is False; under ``auto`` it stays float."""
    if not wants_int8_weights(target.engine, weights):
        return False
    if drafter.use_int8_weights():
        return True
    if strict if strict is not None else weights == "int8":
        raise DrafterSpecError(
            f"int8 weights are not available for {label} on {target.device}: they need a feature drafter "
            "(its own layers) on a CPU and a torch build with fbgemm's quantized kernels"
        )
    return False


def _resolve(spec: str, target) -> ResolvedDrafter:
    spec = spec.strip()
    if not spec:
        raise DrafterSpecError("empty drafter spec: use auto, layers:N, none or a checkpoint path")
    if spec.lower() in NONE_SPECS:
        return ResolvedDrafter(None, "none (vanilla decoding)", trained=False)
    if spec.lower() == "auto":
        packaged = packaged_drafter_path(target)
        if packaged is not None:
            drafter = _load_checkpoint(packaged, target)
            return ResolvedDrafter(drafter, f"packaged {drafter.method} drafter ({packaged.name})", trained=True)
        return _stand_in(target, min(STAND_IN_LAYERS, max(1, target.num_layers - 1)))
    if spec.lower().startswith("layers:"):
        value = spec.split(":", 1)[1]
        try:
            n = int(value)
        except ValueError:
            raise DrafterSpecError(f"bad drafter spec {spec!r}: layers:N needs an integer N") from None
        if not 1 <= n <= target.num_layers:
            raise DrafterSpecError(f"bad drafter spec {spec!r}: the target has {target.num_layers} layers")
        return _stand_in(target, n)
    path = Path(spec).expanduser()
    if not path.exists():
        raise FileNotFoundError(
            f"drafter checkpoint {spec!r} not found (use auto, layers:N, none or an existing checkpoint path)"
        )
    drafter = _load_checkpoint(path, target)
    return ResolvedDrafter(drafter, f"{drafter.method} drafter from {path}", trained=True)


def _stand_in(target, n: int) -> ResolvedDrafter:
    return ResolvedDrafter(
        follow_target_packing(StandardDrafter.from_target_layers(target, n), target),
        f"untrained stand-in: the target's first {n} layer{'s' if n != 1 else ''}",
        trained=False,
    )


def _load_checkpoint(path: Path, target) -> Drafter:
    from .checkpoint import load_drafter  # imported lazily: loads safetensors and the registry

    return load_drafter(str(path), target)
