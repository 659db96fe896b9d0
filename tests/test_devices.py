"""Device helpers: profiler labels cost nothing unless a profiler records."""

from __future__ import annotations

from contextlib import nullcontext

import torch
from torch.profiler import ProfilerActivity, profile

from prism_spec.devices import median_seconds, profiled


def test_profiled_labels_only_while_a_profiler_records():
    assert isinstance(profiled("idle"), nullcontext)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        with profiled("labelled_phase"):
            torch.ones(4).sum()
    assert "labelled_phase" in {event.key for event in prof.key_averages()}
    assert isinstance(profiled("idle again"), nullcontext)


def test_median_seconds_calls_once_more_for_warm_up():
    calls = []
    seconds = median_seconds(lambda: calls.append(1), repeats=3)
    assert len(calls) == 4 and seconds >= 0.0
