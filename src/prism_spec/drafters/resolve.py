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
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import NamedTuple

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


def resolve_drafter(spec: str, target) -> ResolvedDrafter:
    """Build the drafter that ``spec`` names for ``target`` (see the module docstring)."""
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
