"""``prism bench``: benchmarks, method specs, metrics, an interleaved resumable runner and reports.

See ``docs/bench.md`` for how to read the outputs and how acceptance length is defined.
"""

from .datasets import BENCHMARKS, Benchmark, Question, load_benchmark, load_benchmarks
from .methods import MethodSpec, load_method, method_kinds, parse_methods
from .runner import BenchConfig, run_bench

__all__ = [
    "BENCHMARKS",
    "method_kinds",
    "BenchConfig",
    "Benchmark",
    "MethodSpec",
    "Question",
    "load_benchmark",
    "load_benchmarks",
    "load_method",
    "parse_methods",
    "run_bench",
]
