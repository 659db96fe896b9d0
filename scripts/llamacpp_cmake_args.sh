#!/usr/bin/env bash
# Prints the CMAKE_ARGS that build llama-cpp-python for this machine's CPU:
#   CMAKE_ARGS="$(bash scripts/llamacpp_cmake_args.sh)" pip install --no-cache-dir 'llama-cpp-python==0.3.36'
# Each instruction set is switched on only where /proc/cpuinfo lists it. A build with one the
# CPU lacks dies of SIGILL at its first decode; the default native build crashed in multi-token
# decodes on the Intel VMs measured (docs/llamacpp.md), hence explicit flags. AMX stays off.
set -euo pipefail
flags=" $(grep -m1 '^flags' /proc/cpuinfo 2>/dev/null | cut -d: -f2) "
has() { if [[ "$flags" == *" $1 "* ]]; then echo ON; else echo OFF; fi; }
echo "-DGGML_NATIVE=OFF -DGGML_AVX=$(has avx) -DGGML_AVX2=$(has avx2) -DGGML_FMA=$(has fma)" \
     "-DGGML_F16C=$(has f16c) -DGGML_BMI2=$(has bmi2) -DGGML_AVX512=$(has avx512f)" \
     "-DGGML_AVX512_VBMI=$(has avx512vbmi) -DGGML_AVX512_VNNI=$(has avx512_vnni)" \
     "-DGGML_AVX512_BF16=$(has avx512_bf16) -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF"
