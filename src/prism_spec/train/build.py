"""The drafter a training run trains: the target's path and the feature layers resolved from
the config, a fresh trainable drafter (or one started from a trained ``init_from`` drafter),
and the trained drafter exported as a drafter folder that ``load_drafter`` reads."""

from __future__ import annotations

import copy

import torch
from torch import nn

from ..drafters.checkpoint import (
    CheckpointError,
    read_feature_drafter,
    save_feature_drafter,
    save_standard_drafter,
)
from ..drafters.feature import FeatureDrafterConfig, FeatureDrafterModel
from ..drafters.standard import StandardDrafter
from ..targets.default import DEFAULT_TARGET, default_target_path
from ..targets.hf import Target, default_feature_layers, parse_dtype
from .config import TrainConfig
from .errors import ConfigError


def resolve_target_path(name: str) -> str:
    """The folder or hub id to load target ``name`` from (the embedded default target's folder)."""
    return str(default_target_path()) if name == DEFAULT_TARGET else name


def resolve_input_layers(config: TrainConfig, num_layers: int) -> list[int] | None:
    """The HF hidden_states indices the drafter reads (``drafter.input_layers``), None for the last hidden state."""
    spec = config.drafter.input_layers
    if spec == "none":
        return None
    layers = list(default_feature_layers(num_layers)) if spec == "auto" else list(spec)
    bad = [i for i in layers if not 0 <= i <= num_layers]
    if bad:
        raise ConfigError(
            f"drafter.input_layers {layers}: the target has {num_layers} layers, so HF hidden_states "
            f"indices run 0..{num_layers}"
        )
    return layers


def build_drafter(
    config: TrainConfig, target: Target, input_layers: list[int] | None, d2t: torch.Tensor | None = None
) -> nn.Module:
    """A fresh trainable drafter for ``target`` (float32 master weights, train mode)."""
    d = config.drafter
    if d.trains_as == "standard":
        shallow = StandardDrafter.from_target_layers(target, d.standard_layers)
        # from_target_layers SHARES the target's tensors: train a deep copy, never the target.
        model = copy.deepcopy(shallow.lm.model)
        del shallow
    else:
        fcfg = FeatureDrafterConfig.for_target(
            target,
            architecture=d.architecture,
            num_modules=d.num_modules,
            layers_per_module=d.layers_per_module,
            step_mapping=d.resolved_step_mapping(),
            input_layers=input_layers,
            input_norm=bool(input_layers) and d.input_norm,
            draft_vocab_size=d.draft_vocab_size,
        )
        model = FeatureDrafterModel(fcfg, target, d2t=d2t)
        if d.init_from_target_layer is not None:
            copy_target_layer(model, target, d.init_from_target_layer)
    model = model.float()
    if d.trains_as == "standard":
        from .objectives import attach_target_head

        attach_target_head(model, target.lm_head)  # the distillation target, never trained
    for p in model.parameters():
        p.requires_grad_(True)
    return model.train()


def copy_target_layer(drafter: FeatureDrafterModel, target: Target, index: int) -> None:
    """Start every decoder layer of every processing module of ``drafter`` as a copy of target
    layer ``index`` (negative: from the end): trained attention and MLP weights instead of
    random ones. The first layer of a module has no input norm (its input is the fc output),
    so that one weight is not copied; the fc stays random."""
    layers = target.family.layers
    if not -len(layers) <= index < len(layers):
        raise ConfigError(f"drafter.init_from_target_layer {index}: {target.name} has {len(layers)} layers "
                          f"(0..{len(layers) - 1}, or -1..-{len(layers)} from the end)")
    source = layers[index].state_dict()
    with torch.no_grad():
        for module in drafter.processing:
            for layer in module.layers:
                own = layer.state_dict()
                odd = [k for k, v in own.items() if k not in source or source[k].shape != v.shape]
                if odd:
                    raise ConfigError(
                        f"drafter.init_from_target_layer: the drafter's layers are not {target.family.model_type} "
                        f"layers ({', '.join(odd[:3])} differ), so they cannot start as a copy of one")
                layer.load_state_dict({k: source[k] for k in own}, strict=True)


def read_init_state(config: TrainConfig, target: Target, input_layers: list[int] | None) -> dict:
    """The weights of the ``init_from`` drafter, after checking its shape against the config."""
    try:
        saved, state = read_feature_drafter(config.init_from)
    except (CheckpointError, OSError, ValueError) as e:
        raise ConfigError(f"init_from: {e}") from None
    d = config.drafter
    wanted = {"architecture": d.architecture, "num_modules": d.num_modules,
              "layers_per_module": d.layers_per_module, "step_mapping": d.resolved_step_mapping(),
              "input_layers": input_layers, "draft_vocab_size": d.draft_vocab_size,
              "hidden_size": int(target.hidden_size), "vocab_size": int(target.vocab_size)}
    got = {k: getattr(saved, k) for k in wanted}
    wrong = {k: (got[k], v) for k, v in wanted.items() if got[k] != v}
    if wrong:
        detail = ", ".join(f"{k}: drafter {a!r} vs config {b!r}" for k, (a, b) in wrong.items())
        raise ConfigError(f"init_from {config.init_from} does not match this run's drafter ({detail})")
    return state


def load_init_state(drafter: nn.Module, state: dict) -> None:
    """Start ``drafter`` from the weights :func:`read_init_state` returned (as float32 master weights)."""
    with torch.no_grad():
        drafter.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()},
                                strict=True)


def export_drafter(drafter: nn.Module, config: TrainConfig, target: Target, folder, extra: dict) -> None:
    """Save the trainable ``drafter`` as a drafter folder (in ``config.save_dtype``); ``extra``
    goes into a feature drafter's config (what run and stage trained it)."""
    if config.drafter.trains_as == "standard":
        head = drafter.__dict__.get("target_head")
        model = copy.deepcopy(drafter, memo={id(head): None} if head is not None else None).eval()
        model.__dict__.pop("target_head", None)
        if config.save_dtype:
            model = model.to(parse_dtype(config.save_dtype))
        for p in model.parameters():
            p.requires_grad_(False)
        save_standard_drafter(StandardDrafter(model, name=f"{config.target}-standard"), target, folder)
    else:
        save_feature_drafter(drafter, folder, dtype=config.save_dtype, extra=extra)
