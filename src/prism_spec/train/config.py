"""Typed training configuration: recipes, config files (JSON / TOML / YAML) and ``--set`` overrides.

A run is described by one :class:`TrainConfig` tree::

    TrainConfig
      target, dtype, mixed_precision, output_dir, seed, save_dtype,
      checkpoint_every, keep_checkpoints, eval_every, log_every
      drafter: DrafterSpec   architecture, num_modules, step_mapping, layers_per_module,
                             input_layers, standard_layers
      data:    DataConfig    paths, max_length, fraction, max_examples, seed, holdout,
                             feature_cache (a folder: offline features; None: online)
      stages:  [StageConfig] name, objective, aligned_steps, feature_weight, ce_weight,
                             topk_weight, topk, noise_std, step_weights, steps | epochs, lr,
                             batch_size, grad_accum, warmup_ratio, rewarm_steps, weight_decay, betas,
                             clip, clip_mode, copy_module0_after, enabled

Layering, each on top of the previous one: a recipe (registered with its drafter kind, see
:mod:`prism_spec.drafters.kinds`), a config file, explicit
keyword values (what the CLI flags give), then dotted ``key=value`` overrides
(:mod:`prism_spec.train.overrides`). Every layer is type checked (:mod:`prism_spec.train.schema`);
an unknown key raises :class:`~prism_spec.train.errors.ConfigError` naming the key and the valid
ones. Old objective names in saved configs are read as the current ones (:data:`OBJECTIVE_ALIASES`).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping, Sequence, Union

from ..drafters.base import REGISTRY, registered_recipes
from ..options import TRAINING_SEED_MAX
from .errors import ConfigError
from .overrides import apply_override, merge, parse_override
from .schema import from_dict, table_list, to_plain

OBJECTIVES = ("hass", "tuning", "eagle", "standard")
#: Old objective names that saved configs and checkpoints may hold, read as the current name
#: (:func:`resolve_aliases`, applied wherever a config dict becomes a TrainConfig). "warmup" is
#: the HASS objective's name from before it was called "hass" (the PRISM recipe's stage that
#: uses it is still *named* "warmup").
OBJECTIVE_ALIASES = {"warmup": "hass"}
MIXED_PRECISION = ("no", "bf16", "fp16")
DTYPES = ("float32", "fp32", "bfloat16", "bf16", "float16", "fp16", "float64")


# --------------------------------------------------------------------------- the tree
@dataclass
class DrafterSpec:
    #: A registered drafter architecture (drafters.base.REGISTRY): eagle, prism, stacked, standard, ...
    architecture: str = "eagle"
    #: Processing modules (PRISM: 2; EAGLE/HASS/stacked: 1).
    num_modules: int = 1
    #: Draft step -> module; None: step j -> module min(j, num_modules - 1).
    step_mapping: list[int] | None = None
    #: Decoder layers per module (stacked baselines: 2 or 3).
    layers_per_module: int = 1
    #: "none": the target's last hidden state; "auto": low/middle/high layers (EAGLE-3 / PRISM*);
    #: or explicit HF hidden_states indices.
    input_layers: Union[Literal["none", "auto"], list[int]] = "none"
    #: With input_layers: RMS-normalise each target layer before fusing them (raw layers carry
    #: massive activations; see FeatureDrafterConfig.input_norm).
    input_norm: bool = True
    #: Standard drafter only: how many of the target's first layers to copy and distill.
    standard_layers: int = 2
    #: Feature drafters only: predict over the N most frequent target tokens of the training
    #: data (EAGLE-3-style reduced vocabulary; cuts the LM-head cost). None: full vocabulary.
    draft_vocab_size: int | None = None
    #: Feature drafters only: start every decoder layer as a copy of this target layer
    #: (negative: from the end) instead of a random initialisation; None: random.
    init_from_target_layer: int | None = None

    def resolved_step_mapping(self) -> list[int]:
        return list(self.step_mapping) if self.step_mapping else list(range(self.num_modules))

    @property
    def trains_as(self) -> str:
        """How this architecture trains: "feature" or "standard" (drafters.base.DrafterKind)."""
        return REGISTRY[self.architecture].trains_as


@dataclass
class DataConfig:
    #: Training files (JSON / JSONL conversations, prompts, Alpaca-style records, ...).
    paths: list[str] = field(default_factory=list)
    #: Tokens per example after the chat template (longer ones are truncated).
    max_length: int = 2048
    #: Keep this fraction of the conversations (a seeded random subset).
    fraction: float = 1.0
    #: Keep at most this many conversations (after ``fraction``).
    max_examples: int | None = None
    #: Seed of the subset choice and of the held-out split.
    seed: int = 0
    #: Drop exact repeats of a conversation before subsetting and the held-out split (prompt
    #: sets repeat short prompts such as "hi" hundreds of times, and a repeat on both sides of
    #: the split inflates the validation accuracy).
    dedupe: bool = True
    #: Batches of examples of similar length (shuffled windows sorted by length, see
    #: data_order.DataOrder): far less padding, so more trained tokens per second; off by default so
    #: that earlier runs' data order is kept.
    group_by_length: bool = False
    #: Held-out validation examples: a fraction (< 1) or a count (>= 1); 0 disables validation.
    holdout: float = 0.02
    #: Offline features: a folder holding (or to receive) the target's captured features.
    #: None: online, the frozen target runs inside the trainer.
    feature_cache: str | None = None
    #: dtype the offline cache stores features in.
    feature_dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"
    #: Read only these shards (indices) of the token-id corpora in ``paths``; None: every
    #: finished shard. Pins the data of runs that must see the same examples while a corpus
    #: is still growing (a campaign level); a listed shard that is not finished is an error.
    corpus_shards: list[int] | None = None
    #: Online features handed between runs on one machine (features.SharedFeatures): a folder
    #: where a run in role "write" leaves each training batch's features and a later run in
    #: role "read" takes them instead of running the target again for the same batch (a
    #: campaign's EAGLE-2 and HASS segments walk the same batches); role "reuse" is a plain
    #: cache (reads and keeps, writes what it computed) for many runs over the same batches.
    #: None: off.
    feature_share: str | None = None
    feature_share_role: Literal["write", "read", "reuse"] = "read"


@dataclass
class StageConfig:
    name: str = "train"
    #: Loss family (see train/objectives.py): hass, tuning (PRISM stage 2), eagle, standard.
    objective: Literal["hass", "tuning", "eagle", "standard"] = "hass"
    #: A disabled stage is skipped (recipes ship optional stages this way).
    enabled: bool = True
    aligned_steps: int = 3
    feature_weight: float = 1.0
    ce_weight: float = 0.1
    topk_weight: float = 0.0
    topk: int = 10
    noise_std: float = 0.2
    step_weights: list[float] | None = None
    #: Optimizer steps; when None, ``epochs`` passes over the training split.
    steps: int | None = None
    epochs: float | None = 1.0
    lr: float = 3e-5
    #: Examples per process per micro-batch.
    batch_size: int = 4
    #: Micro-batches per optimizer step.
    grad_accum: int = 1
    warmup_ratio: float = 0.01
    #: A stage whose fresh optimizer starts on trained weights (``init_from``, a continued
    #: ``start_step``, or any stage after the first) ramps its learning rate up over this many
    #: steps as well (0: off): Adam's first steps from empty moments move every weight by about
    #: the full rate, which undoes part of the training it starts from.
    rewarm_steps: int = 16
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.95)
    #: Gradient clipping threshold (None or 0: off); by value (paper) or by global norm.
    clip: float | None = 0.5
    clip_mode: Literal["value", "norm"] = "value"
    #: PRISM: copy module 0 into every other module when this stage ends.
    copy_module0_after: bool = False


@dataclass
class TrainConfig:
    #: Hub id, local folder, or "smollm2-135m" (the embedded default target).
    target: str = "smollm2-135m"
    #: dtype the frozen target is loaded in (the drafter's master weights are float32).
    dtype: str = "float32"
    drafter: DrafterSpec = field(default_factory=DrafterSpec)
    data: DataConfig = field(default_factory=DataConfig)
    #: A table list (schema.table_list): overrides and merged files address a stage by index or name.
    stages: list[StageConfig] = field(default_factory=lambda: [StageConfig()],
                                      metadata=table_list("stage", example="lr=1e-4"))
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    output_dir: str = "runs/drafter"
    #: dtype of the shipped drafter folders (None: as trained, float32).
    save_dtype: str | None = None
    #: Training checkpoint every N optimizer steps (counted over all stages); 0: stage ends only.
    checkpoint_every: int = 200
    keep_checkpoints: int = 2
    #: Validation every N optimizer steps (0: at each stage end only).
    eval_every: int = 0
    log_every: int = 10
    seed: int = 0
    #: The recipe this config started from (informational).
    recipe: str | None = None
    #: A feature-drafter folder to start from instead of a fresh initialisation (fine-tuning a
    #: trained drafter on new data): its config must match ``drafter`` (architecture, modules,
    #: layers, input layers, vocabulary size) and its draft vocabulary replaces the one the
    #: data would give. A resumed run ignores it (the checkpoint holds the weights).
    init_from: str | None = None
    #: Stop after the optimizer step that passes this many seconds of training and save the
    #: drafter as it is (later stages are skipped); ``Trainer.stopped_at`` says where it stopped.
    #: For time-boxed jobs (a GPU call, a CPU session); None: no limit.
    time_limit_s: float | None = None
    #: Validate where a time limit stopped training (the stage-end validation of a stage the
    #: limit cut). A campaign turns it off: on a 2-core CPU it costs minutes of the budget, and
    #: only a finished segment's validation enters a level.
    eval_when_cut: bool = True
    #: Begin the first enabled stage at this step of its schedule and data order, from
    #: ``init_from``'s weights with a fresh optimizer (its learning rate re-warmed over the
    #: stage's ``rewarm_steps``): how a campaign continues a stage that a time limit cut,
    #: on another machine, without carrying optimizer state. 0: from the start.
    start_step: int = 0

    # ------------------------------------------------------------------ helpers
    def to_dict(self) -> dict:
        return to_plain(dataclasses.asdict(self))

    def enabled_stages(self) -> list[tuple[int, StageConfig]]:
        return [(i, s) for i, s in enumerate(self.stages) if s.enabled]

    def validate(self, check_files: bool = True) -> "TrainConfig":
        """Raise ConfigError for any value that would fail later; returns self."""
        errors: list[str] = []

        def need(cond: bool, msg: str):
            if not cond:
                errors.append(msg)

        d, data = self.drafter, self.data
        need(bool(self.target), "target must name a model")
        need(self.dtype in DTYPES, f"dtype {self.dtype!r} is not one of {list(DTYPES)}")
        need(self.save_dtype is None or self.save_dtype in DTYPES,
             f"save_dtype {self.save_dtype!r} is not one of {list(DTYPES)} (or null)")
        need(bool(self.output_dir), "output_dir must be set")
        need(self.checkpoint_every >= 0, "checkpoint_every must be >= 0")
        need(self.keep_checkpoints >= 1, "keep_checkpoints must be >= 1")
        need(self.eval_every >= 0, "eval_every must be >= 0")
        need(self.log_every >= 1, "log_every must be >= 1")
        need(0 <= self.seed <= TRAINING_SEED_MAX,
             f"seed must be an integer in [0, {TRAINING_SEED_MAX}] (numpy's seed range), got {self.seed}")
        # drafter
        if d.architecture not in REGISTRY:
            raise ConfigError(f"drafter.architecture: {d.architecture!r} is not one of the registered architectures "
                              f"{list(REGISTRY)}")
        standard = REGISTRY[d.architecture].trains_as == "standard"
        need(d.num_modules >= 1, "drafter.num_modules must be >= 1")
        need(d.layers_per_module >= 1, "drafter.layers_per_module must be >= 1")
        need(d.standard_layers >= 1, "drafter.standard_layers must be >= 1")
        need(d.draft_vocab_size is None or d.draft_vocab_size >= 1, "drafter.draft_vocab_size must be >= 1")
        need(d.draft_vocab_size is None or not standard,
             "drafter.draft_vocab_size applies to feature drafters, not the standard drafter")
        need(d.init_from_target_layer is None or not standard,
             "drafter.init_from_target_layer applies to feature drafters (the standard drafter is a copy already)")
        if d.step_mapping is not None:
            need(bool(d.step_mapping) and all(0 <= m < d.num_modules for m in d.step_mapping),
                 f"drafter.step_mapping {d.step_mapping} must name modules 0..{d.num_modules - 1}")
        if isinstance(d.input_layers, list):
            need(bool(d.input_layers) and all(i >= 0 for i in d.input_layers),
                 "drafter.input_layers must be 'none', 'auto' or a non-empty list of layer indices >= 0")
        if d.architecture in ("eagle",):
            need(d.num_modules == 1 and d.layers_per_module == 1,
                 "drafter.architecture 'eagle' has one module of one layer (use 'prism' or 'stacked')")
        if standard:
            need(d.input_layers == "none", "a standard drafter takes no target features (input_layers must be 'none')")
            need(self.init_from is None, "init_from applies to feature drafters, not the standard drafter")
        need(self.start_step >= 0, f"start_step must be >= 0, got {self.start_step}")
        need(self.start_step == 0 or self.init_from is not None,
             "start_step continues a cut stage from its saved drafter: it needs init_from")
        need(self.time_limit_s is None or self.time_limit_s > 0,
             f"time_limit_s must be > 0 seconds, got {self.time_limit_s}")
        if check_files and self.init_from is not None:
            need(Path(self.init_from, "config.json").is_file(),
                 f"init_from {self.init_from!r} is not a drafter folder (no config.json)")
        # data
        need(bool(data.paths), "data.paths is empty: give at least one training file (--data FILE)")
        need(data.max_length >= 8, "data.max_length must be >= 8")
        need(0.0 < data.fraction <= 1.0, f"data.fraction must be in (0, 1], got {data.fraction}")
        need(data.max_examples is None or data.max_examples >= 1, "data.max_examples must be >= 1")
        need(not (data.feature_share and data.feature_cache),
             "data.feature_share applies to online features; data.feature_cache is set (offline)")
        need(data.feature_share_role in ("write", "read", "reuse"),
             f"data.feature_share_role must be 'write', 'read' or 'reuse', got {data.feature_share_role!r}")
        need(data.corpus_shards is None or all(isinstance(k, int) and k >= 0 for k in data.corpus_shards),
             f"data.corpus_shards must be a list of shard indices (>= 0), got {data.corpus_shards}")
        need(data.holdout >= 0 and (data.holdout < 1 or float(data.holdout).is_integer()),
             f"data.holdout must be a fraction in [0, 1) or a whole count, got {data.holdout}")
        if check_files:
            for p in data.paths:
                path = Path(p)
                if not path.exists():
                    errors.append(f"data file {p} does not exist")
                elif path.is_dir() and not (path / "corpus.json").is_file():  # a corpus folder is one source
                    errors.append(f"data path {p} is a folder; give the data files (or a `prism corpus` folder)")
        # stages
        enabled = self.enabled_stages()
        need(bool(enabled), "no enabled stage: nothing to train")
        for i, s in enumerate(self.stages):
            where = f"stages.{i} ({s.name})"
            if not s.enabled:
                continue
            need(s.lr > 0, f"{where}: lr must be > 0, got {s.lr}")
            need(s.batch_size >= 1, f"{where}: batch_size must be >= 1")
            need(s.grad_accum >= 1, f"{where}: grad_accum must be >= 1")
            need(0 <= s.warmup_ratio < 1, f"{where}: warmup_ratio must be in [0, 1)")
            need(s.rewarm_steps >= 0, f"{where}: rewarm_steps must be >= 0")
            need(s.weight_decay >= 0, f"{where}: weight_decay must be >= 0")
            need(all(0 <= b < 1 for b in s.betas), f"{where}: betas must be in [0, 1), got {list(s.betas)}")
            need(s.clip is None or s.clip >= 0, f"{where}: clip must be >= 0 (or null: off)")
            need(s.aligned_steps >= 1, f"{where}: aligned_steps must be >= 1")
            need(s.topk >= 1, f"{where}: topk must be >= 1")
            need(s.noise_std >= 0, f"{where}: noise_std must be >= 0")
            need(min(s.feature_weight, s.ce_weight, s.topk_weight) >= 0, f"{where}: loss weights must be >= 0")
            need(s.feature_weight + s.ce_weight + s.topk_weight > 0, f"{where}: every loss weight is 0")
            if s.step_weights is not None:
                need(len(s.step_weights) == s.aligned_steps,
                     f"{where}: step_weights has {len(s.step_weights)} entries, aligned_steps is {s.aligned_steps}")
            if s.steps is not None:
                need(s.steps >= 1, f"{where}: steps must be >= 1")
            else:
                need(s.epochs is not None and s.epochs > 0, f"{where}: give steps or epochs (> 0)")
            if standard:
                need(s.objective == "standard", f"{where}: a standard drafter trains with objective 'standard'")
            else:
                need(s.objective != "standard",
                     f"{where}: objective 'standard' is for standard drafters only")
            if s.copy_module0_after:
                need(d.num_modules >= 2, f"{where}: copy_module0_after needs num_modules >= 2")
        if errors:
            raise ConfigError("invalid training config:\n  - " + "\n  - ".join(errors))
        return self


def stage_total_steps(stage: StageConfig, num_examples: int, world_size: int = 1) -> int:
    """Optimizer steps of ``stage`` over ``num_examples`` training examples."""
    if stage.steps is not None:
        return int(stage.steps)
    global_batch = stage.batch_size * stage.grad_accum * world_size
    return max(1, math.ceil(float(stage.epochs) * num_examples / global_batch))


# --------------------------------------------------------------------------- recipes
# Recipes belong to the drafter kinds that define them (drafters.kinds, drafters.base.register).
_ALIASES = {"prism-star": "prism*", "prism_star": "prism*", "prismstar": "prism*", "eagle": "eagle2",
            "hass_topk": "hass-topk", "stacked-2": "stacked2", "stacked-3": "stacked3"}


def recipe_descriptions() -> dict[str, str]:
    """Recipe name -> one-line description, for every registered drafter kind."""
    return {name: r.description for name, (_, r) in registered_recipes().items()}


def recipe_names() -> list[str]:
    return list(registered_recipes())


def recipe_dict(name: str) -> dict:
    """The partial config dict of a recipe (merge it onto TrainConfig defaults)."""
    recipes = registered_recipes()
    key = _ALIASES.get(name.lower(), name.lower())
    if key not in recipes:
        raise ConfigError(f"unknown recipe {name!r}; choose one of {list(recipes)}")
    out = copy.deepcopy(recipes[key][1].config())
    out["recipe"] = key
    return out


def recipe(name: str, **values) -> TrainConfig:
    """A recipe as a TrainConfig (``values`` are top-level or dotted overrides)."""
    return build_config(recipe=name, values=values)


# --------------------------------------------------------------------------- files
def read_config_file(path: str | Path) -> dict:
    """A partial config dict from JSON, TOML or YAML (YAML needs pyyaml)."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"config file {path} does not exist")
    text = path.read_text()
    suffix = path.suffix.lower()
    try:
        if suffix == ".json":
            data = json.loads(text)
        elif suffix == ".toml":
            try:
                import tomllib
            except ModuleNotFoundError:  # Python 3.10
                try:
                    import tomli as tomllib  # type: ignore
                except ModuleNotFoundError:
                    raise ConfigError("TOML config files need Python 3.11+ (tomllib) or the tomli package") from None
            data = tomllib.loads(text)
        elif suffix in (".yaml", ".yml"):
            try:
                import yaml
            except ModuleNotFoundError:
                raise ConfigError(f"{path}: YAML config files need pyyaml (pip install pyyaml); "
                                  "or use .json / .toml") from None
            data = yaml.safe_load(text) or {}
        else:
            raise ConfigError(f"config file {path}: unknown format {suffix!r} (use .json, .toml, .yaml or .yml)")
    except ConfigError:
        raise
    except Exception as e:  # parser errors of any of the three libraries
        raise ConfigError(f"cannot parse config file {path}: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a table/mapping at top level")
    return data


# --------------------------------------------------------------------------- entry point
def resolve_aliases(data: Mapping) -> dict:
    """A copy of the (partial) config dict ``data`` whose stages name their objective by its
    current name: an old name of :data:`OBJECTIVE_ALIASES` ("warmup") becomes the new one ("hass")."""
    out = dict(data)
    stages = out.get("stages")
    if isinstance(stages, list):
        out["stages"] = [
            {**s, "objective": OBJECTIVE_ALIASES[s["objective"]]}
            if isinstance(s, Mapping) and isinstance(s.get("objective"), str) and s["objective"] in OBJECTIVE_ALIASES
            else s
            for s in stages
        ]
    return out


def build_config(
    recipe: str | None = None,
    config_file: str | Path | None = None,
    values: Mapping[str, Any] | None = None,
    overrides: Sequence[str] = (),
    validate: bool = True,
    check_files: bool = True,
    all_stages: Mapping[str, Any] | None = None,
) -> TrainConfig:
    """Recipe -> config file -> ``values`` (dotted keys allowed) -> ``all_stages`` (fields set
    on every stage, e.g. ``{"steps": 20}``) -> ``key=value`` overrides."""
    data: dict = {}
    if recipe:
        data = merge(data, recipe_dict(recipe), TrainConfig)
    if config_file:
        file_data = read_config_file(config_file)
        if not recipe and file_data.get("recipe"):
            data = merge(data, recipe_dict(str(file_data["recipe"])), TrainConfig)
        data = merge(data, file_data, TrainConfig)
    for key, value in (values or {}).items():
        data = apply_override(data, key, value, TrainConfig)
    if all_stages:
        if not isinstance(data.get("stages"), list):
            data["stages"] = [dataclasses.asdict(s) for s in TrainConfig().stages]
        for i in range(len(data["stages"])):
            for key, value in all_stages.items():
                data = apply_override(data, f"stages.{i}.{key}", value, TrainConfig)
    for item in overrides:
        data = apply_override(data, *parse_override(item), TrainConfig)
    config = from_dict(TrainConfig, resolve_aliases(data))
    return config.validate(check_files=check_files) if validate else config


def config_from_dict(data: Mapping, validate: bool = True, check_files: bool = True) -> TrainConfig:
    """A TrainConfig from a whole or partial config dict (e.g. a saved ``train_config.json``
    without its ``resolved`` part); old objective names are read as the current ones."""
    config = from_dict(TrainConfig, resolve_aliases(data))
    return config.validate(check_files=check_files) if validate else config


def save_config(config: TrainConfig, path: str | Path) -> None:
    Path(path).write_text(json.dumps(config.to_dict(), indent=2) + "\n")
