"""Which llama-cpp-python build suits this CPU: read without llama-cpp-python installed."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from prism_spec.targets import llamacpp
from prism_spec.targets.llamacpp import cmake_args, cpu_flags, missing_instruction_sets

AVX512_BUILD = ("CPU : SSE3 = 1 | SSSE3 = 1 | AVX = 1 | AVX_VNNI = 0 | AVX2 = 1 | F16C = 1 | FMA = 1 | BMI2 = 1 | "
                "AVX512 = 1 | AVX512_VBMI = 0 | AVX512_VNNI = 1 | AVX512_BF16 = 1 | LLAMAFILE = 1 | OPENMP = 1 | "
                "REPACK = 1 |")
ZEN3 = {"fpu", "pni", "ssse3", "fma", "sse4_2", "avx", "f16c", "avx2", "bmi2"}  # no AVX-512
SAPPHIRE_RAPIDS = ZEN3 | {"avx512f", "avx512_vnni", "avx512_bf16", "avx512vbmi", "amx_int8"}


def test_a_build_for_instructions_the_cpu_lacks_is_told():
    assert missing_instruction_sets(AVX512_BUILD, ZEN3) == ["AVX512", "AVX512_VNNI", "AVX512_BF16"]
    assert missing_instruction_sets(AVX512_BUILD, SAPPHIRE_RAPIDS) == []
    assert missing_instruction_sets(AVX512_BUILD, None) == []  # flags unknown: nothing claimed
    # Switched-off sets ("= 0") and non-instruction entries are not requirements.
    assert missing_instruction_sets("CPU : AVX512_VBMI = 0 | OPENMP = 1 | REPACK = 1 |", set()) == []


def test_cmake_args_switch_on_only_what_the_cpu_has():
    zen3 = cmake_args(ZEN3)
    assert "-DGGML_NATIVE=OFF" in zen3 and "-DGGML_AVX2=ON" in zen3 and "-DGGML_BMI2=ON" in zen3
    assert "-DGGML_AVX512=OFF" in zen3 and "-DGGML_AVX512_BF16=OFF" in zen3
    spr = cmake_args(SAPPHIRE_RAPIDS)
    assert "-DGGML_AVX512=ON" in spr and "-DGGML_AVX512_VNNI=ON" in spr and "-DGGML_AMX_INT8=OFF" in spr


def test_cpu_flags_reads_the_flags_line(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nmodel name\t: X\nflags\t\t: fpu avx avx2 pni\n\nprocessor\t: 1\nflags : other\n")
    assert cpu_flags(info) == {"fpu", "avx", "avx2", "pni"}
    assert cpu_flags(tmp_path / "missing") is None


@pytest.mark.skipif(cpu_flags() is None, reason="no /proc/cpuinfo to read")
def test_the_ci_script_prints_the_same_arguments():
    script = Path(__file__).resolve().parents[2] / "scripts" / "llamacpp_cmake_args.sh"
    printed = subprocess.run(["bash", str(script)], capture_output=True, text=True, check=True).stdout
    assert printed.split() == cmake_args(cpu_flags()).split()


def test_the_engine_refuses_a_build_this_cpu_cannot_run(monkeypatch):
    class FakeLlamaCpp:  # stands in for the module: only its system-info line is read first
        @staticmethod
        def llama_print_system_info():
            return AVX512_BUILD.encode()

    monkeypatch.setitem(sys.modules, "llama_cpp", FakeLlamaCpp)
    monkeypatch.setattr(llamacpp, "_CHECKED_BUILD", False)
    monkeypatch.setattr(llamacpp, "cpu_flags", lambda: ZEN3)
    with pytest.raises(ImportError, match=r"uses AVX512, AVX512_VNNI, AVX512_BF16, which this CPU does not have"
                                          r".*CMAKE_ARGS=\"-DGGML_NATIVE=OFF.*-DGGML_AVX512=OFF"):
        llamacpp.llama_cpp_module()
    assert llamacpp._CHECKED_BUILD is False  # refused again on the next call
