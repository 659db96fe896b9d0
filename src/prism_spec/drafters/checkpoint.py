"""Drafter checkpoints: a folder with ``config.json`` and ``model.safetensors``.

Our own layout names the architecture (``eagle``, ``prism``, ``stacked``, ``standard`` or any
other registered one: :mod:`prism_spec.drafters.base`, which says how to load it) and
the target the drafter was trained for, so loading against another target fails clearly. The
public EAGLE-1/2 and HASS layout (an EAGLE config.json with ``fc.*`` and ``layers.0.*`` weights
in ``model.safetensors`` or ``pytorch_model.bin``) loads as a one-module ``eagle`` drafter.
Writes are atomic: a crash leaves the old folder or none, never half a checkpoint.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..targets.hf import Target, parse_dtype
from .base import REGISTRY, Drafter, DrafterMismatchError, drafter_kind, follow_target_packing
from .feature import FeatureDrafter, FeatureDrafterConfig, FeatureDrafterModel, check_d2t
from .standard import StandardDrafter

FORMAT = "prism-spec/1"
CONFIG = "config.json"
WEIGHTS = "model.safetensors"


class CheckpointError(ValueError):
    """A checkpoint folder is missing, corrupt, partial or of an unknown layout."""


def _leftovers(folder: Path, kind: str) -> list[Path]:
    """``.NAME.tmp-*`` / ``.NAME.old-*`` siblings of ``folder``, oldest first."""
    if not folder.parent.is_dir():
        return []
    found = [p for p in folder.parent.glob(f".{glob.escape(folder.name)}.{kind}-*") if p.is_dir()]
    return sorted(found, key=lambda p: p.stat().st_mtime)


def recover_interrupted_write(folder: str | os.PathLike) -> None:
    """Undo what a write killed outright (SIGKILL, power loss) left behind: when it died between
    moving the previous ``folder`` aside and moving the new one in, ``folder`` is missing and
    the previous content sits in ``.NAME.old-*/x``: put it back. Called before every write and
    by the readers, so a killed write never loses the checkpoint that was there."""
    folder = Path(folder)
    if folder.exists() or folder.is_symlink():
        return
    aside = [old / "x" for old in _leftovers(folder, "old") if (old / "x").is_dir()]
    if aside:
        os.replace(aside[-1], folder)
        shutil.rmtree(aside[-1].parent, ignore_errors=True)


def atomic_folder_write(folder: str | os.PathLike, write) -> Path:
    """Call ``write(tmp_folder)`` then move the result to ``folder`` in one rename. A write
    killed outright leaves the previous folder (or, in the instant between the two renames,
    the previous folder set aside, which the next write or read puts back); temporary folders
    of killed writes are removed once a later write of ``folder`` succeeds (one writer per
    folder at a time)."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    recover_interrupted_write(folder)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
    old = None
    try:
        write(tmp)
        if folder.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{folder.name}.old-", dir=folder.parent))
            os.replace(folder, old / "x")
        os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and (old / "x").exists() and not folder.exists():
            os.replace(old / "x", folder)  # put the previous checkpoint back
        raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    for stale in _leftovers(folder, "tmp") + _leftovers(folder, "old"):  # of writes killed earlier
        shutil.rmtree(stale, ignore_errors=True)
    return folder


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def save_feature_drafter(
    model: FeatureDrafterModel, folder: str | os.PathLike, dtype: str | torch.dtype | None = None, extra: dict | None = None
) -> Path:
    """Save the trainable weights (never the target's embedding or head) and, for a reduced
    draft vocabulary, the ``d2t`` id map. ``dtype`` casts floating tensors only."""
    cast = parse_dtype(dtype) if dtype else None
    state = {
        k: (v.to(cast) if cast and v.is_floating_point() else v).detach().contiguous().cpu()
        for k, v in model.state_dict().items()
    }
    config = {"format": FORMAT, **model.config.to_dict(), **(extra or {})}

    def write(tmp: Path):
        save_file(state, str(tmp / WEIGHTS), metadata={"format": "pt"})
        _write_json(tmp / CONFIG, config)

    return atomic_folder_write(folder, write)


def save_standard_drafter(drafter: StandardDrafter, target: Target, folder: str | os.PathLike) -> Path:
    model = drafter.lm.model

    def write(tmp: Path):
        model.save_pretrained(tmp, safe_serialization=True)
        config = json.loads((tmp / CONFIG).read_text())
        config.update(
            {"format": FORMAT, "architecture": "standard", "target_name": str(target.name),
             "target_vocab_size": target.vocab_size}
        )
        _write_json(tmp / CONFIG, config)

    return atomic_folder_write(folder, write)


def _read_config(folder: Path) -> dict:
    recover_interrupted_write(folder)
    if not folder.is_dir():
        raise CheckpointError(f"drafter checkpoint {folder} is not a folder")
    path = folder / CONFIG
    if not path.exists():
        raise CheckpointError(f"{folder} has no {CONFIG}: not a drafter checkpoint")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON ({e}): corrupt checkpoint") from None


def _read_weights(folder: Path) -> dict[str, torch.Tensor]:
    st, bin_ = folder / WEIGHTS, folder / "pytorch_model.bin"
    try:
        if st.exists():
            return load_file(str(st))
        if bin_.exists():
            return torch.load(str(bin_), map_location="cpu", weights_only=True)
    except (SafetensorError, RuntimeError, OSError, EOFError) as e:
        raise CheckpointError(f"cannot read the weights in {folder} ({e}): corrupt or partial checkpoint") from None
    raise CheckpointError(f"{folder} has neither {WEIGHTS} nor pytorch_model.bin")


def _eagle_public_to_ours(config: dict, weights: dict[str, torch.Tensor], target: Target):
    """Map the public EAGLE/HASS layout (fc.*, layers.0.*) onto a one-module drafter."""
    ours = FeatureDrafterConfig.for_target(target, architecture="eagle")
    ours.vocab_size = int(config.get("vocab_size", 0))
    ours.hidden_size = int(config.get("hidden_size", 0))
    ours.target_name = "a target of EAGLE checkpoint config " + str(config.get("_name_or_path", "(unnamed)"))
    state = {}
    for key, value in weights.items():
        if key.startswith("fc."):
            state["processing.0." + key] = value
        elif key.startswith("layers.0.") and ".input_layernorm." not in key:
            state["processing.0." + key] = value
        # embed_tokens / lm_head / norm copies are the target's own: not used.
    return ours, state


def _check_draft_vocab(folder: Path, config: FeatureDrafterConfig, state: dict[str, torch.Tensor]) -> None:
    """A reduced-vocabulary drafter must carry a valid d2t map; a full-vocabulary one none."""
    d2t = state.get("d2t")
    if config.draft_vocab_size is None:
        if d2t is not None:
            raise CheckpointError(f"{folder}: the weights hold a d2t map but config.json has no draft_vocab_size")
        return
    if d2t is None:
        raise CheckpointError(
            f"{folder}: config.json sets draft_vocab_size {config.draft_vocab_size} but the weights have no d2t map"
        )
    try:
        check_d2t(d2t, config.vocab_size, config.draft_vocab_size)
    except ValueError as e:
        raise CheckpointError(f"{folder}: corrupt draft vocabulary map d2t: {e}") from None


def _feature_config(folder: Path, config: dict) -> FeatureDrafterConfig:
    arch = config.get("architecture")
    if arch not in REGISTRY or REGISTRY[arch].trains_as != "feature":
        feature = [a for a, kind in REGISTRY.items() if kind.trains_as == "feature"]
        raise CheckpointError(f"{folder}: unknown feature-drafter architecture {arch!r} (registered: {', '.join(feature)})")
    fields = {k: v for k, v in config.items() if k in FeatureDrafterConfig.__dataclass_fields__}
    try:
        return FeatureDrafterConfig(**fields)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{folder / CONFIG}: invalid drafter config ({e})") from None


def read_feature_drafter(path: str | os.PathLike) -> tuple[FeatureDrafterConfig, dict[str, torch.Tensor]]:
    """The config and (checked) state dict of a prism-spec feature-drafter folder, without a
    target: e.g. to start training from it (``TrainConfig.init_from``)."""
    folder = Path(path)
    config = _feature_config(folder, _read_config(folder))
    state = _read_weights(folder)
    _check_draft_vocab(folder, config, state)
    return config, state


def load_drafter(path: str | os.PathLike, target: Target) -> Drafter:
    """Load a drafter folder for ``target`` through the registry entry of the architecture its
    config.json names; a mismatched target raises DrafterMismatchError."""
    folder = Path(path)
    config = _read_config(folder)
    arch = config.get("architecture")
    if arch is None:
        weights = _read_weights(folder)
        if "fc.weight" in weights:  # the public EAGLE / HASS layout
            drafter_config, state = _eagle_public_to_ours(config, weights, target)
            drafter = FeatureDrafter(_feature_model(folder, drafter_config, state, target))
            drafter.check_target(target)
            return follow_target_packing(drafter, target)
    try:
        kind = drafter_kind(arch)
    except ValueError as e:
        raise CheckpointError(f"{folder}: {e}") from None
    return follow_target_packing(kind.load(folder, config, target), target)


def load_standard_drafter(folder: Path, config: dict, target: Target) -> StandardDrafter:
    """The ``load`` of the ``standard`` architecture: a transformers causal LM folder."""
    if int(config.get("target_vocab_size", config.get("vocab_size", -1))) != target.vocab_size:
        raise DrafterMismatchError(
            f"standard drafter {folder} was made for {config.get('target_name')} "
            f"(vocabulary {config.get('target_vocab_size')}), not {target.name} ({target.vocab_size})"
        )
    _read_weights(folder)  # verify before handing to transformers
    return StandardDrafter.from_pretrained(str(folder), dtype=target.dtype, device=str(target.device))


def load_feature_model(folder: Path, config: dict, target: Target) -> FeatureDrafterModel:
    """The checked FeatureDrafterModel of a feature-drafter folder (any registered architecture
    that trains as "feature"), in the target's dtype."""
    return _feature_model(folder, _feature_config(folder, config), _read_weights(folder), target)


def load_feature_drafter(folder: Path, config: dict, target: Target) -> FeatureDrafter:
    """The ``load`` of the feature architectures (eagle, prism, stacked)."""
    drafter = FeatureDrafter(load_feature_model(folder, config, target))
    drafter.check_target(target)
    return drafter


def _feature_model(folder: Path, drafter_config: FeatureDrafterConfig, state: dict, target: Target) -> FeatureDrafterModel:
    if drafter_config.vocab_size != target.vocab_size or drafter_config.hidden_size != target.hidden_size:
        raise DrafterMismatchError(
            f"drafter {folder} was trained for {drafter_config.target_name or 'another target'} (vocabulary "
            f"{drafter_config.vocab_size}, hidden size {drafter_config.hidden_size}); the target {target.name} has "
            f"vocabulary {target.vocab_size} and hidden size {target.hidden_size}"
        )
    _check_draft_vocab(folder, drafter_config, state)
    model = FeatureDrafterModel(drafter_config, target)
    try:
        # Only floating tensors take the target's dtype: the integer d2t map stays exact.
        model.load_state_dict(
            {k: v.to(target.dtype) if v.is_floating_point() else v for k, v in state.items()}, strict=True
        )
    except RuntimeError as e:
        raise CheckpointError(f"weights in {folder} do not fit its config.json: {e}") from None
    return model
