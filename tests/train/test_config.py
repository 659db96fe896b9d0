"""Saved configs across versions: the HASS objective's old name "warmup" still loads, as "hass"."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from prism_spec.train.checkpoints import config_changes, config_fingerprint
from prism_spec.train.config import OBJECTIVE_ALIASES, build_config, config_from_dict
from prism_spec.train.errors import ConfigError

DRAFTERS = Path(__file__).resolve().parents[2] / "results" / "smollm2-135m" / "drafters"
DATA = {"data.paths": ["d.jsonl"]}


def test_a_config_dict_saying_warmup_loads_as_hass():
    data = {
        "data": {"paths": ["d.jsonl"]},
        "drafter": {"architecture": "prism", "num_modules": 2, "step_mapping": [0, 1]},
        "stages": [{"name": "warmup", "objective": "warmup", "copy_module0_after": True, "steps": 4},
                   {"name": "tuning", "objective": "tuning", "steps": 4}],
    }
    config = config_from_dict(data, check_files=False)
    assert OBJECTIVE_ALIASES == {"warmup": "hass"}
    assert [(s.name, s.objective) for s in config.stages] == [("warmup", "hass"), ("tuning", "tuning")]
    assert data["stages"][0]["objective"] == "warmup"  # the caller's dict is left as it was
    assert config.to_dict()["stages"][0]["objective"] == "hass"  # and is saved under the new name


def test_warmup_in_a_config_file_or_an_override(tmp_path):
    old = tmp_path / "old.json"
    old.write_text(json.dumps({"recipe": "hass", "stages": {"hass": {"objective": "warmup"}}}))
    assert build_config(config_file=old, values=DATA, check_files=False).stages[0].objective == "hass"
    config = build_config("eagle2", values=DATA, overrides=["stages.0.objective=warmup"], check_files=False)
    assert config.stages[0].objective == "hass"
    with pytest.raises(ConfigError, match=r"stages\.0\.objective: 'warm' is not one of \['hass'"):
        build_config("eagle2", values=DATA, overrides=["stages.0.objective=warm"], check_files=False)


def test_the_committed_train_configs_that_say_warmup_load():
    saved = [p for p in sorted(DRAFTERS.rglob("train_config.json")) if '"objective": "warmup"' in p.read_text()]
    assert saved, f"no train_config.json under {DRAFTERS} names the objective warmup any more"
    for path in saved:
        data = json.loads(path.read_text())
        data.pop("resolved")  # what the trainer added about the run, not config
        config = config_from_dict(data, check_files=False)
        assert {s.objective for s in config.stages} <= {"hass", "tuning"}, path


def test_a_checkpoint_saying_warmup_is_no_config_change():
    config = build_config("prism", values=DATA, check_files=False)
    fingerprint = config_fingerprint(config.to_dict())
    old = [dict(s, objective="warmup") if s["objective"] == "hass" else s for s in fingerprint["stages"]]
    assert old != fingerprint["stages"]
    assert config_changes({"config": dict(fingerprint, stages=old)}, config.to_dict()) == []
    old[1] = dict(old[1], lr=1.0)
    changes = config_changes({"config": dict(fingerprint, stages=old)}, config.to_dict())
    assert len(changes) == 1 and changes[0].startswith("stages: ")
