# Sourced by the device runs: paths, the default target rebuilt from two halves, the gguf wheel.
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export PRISM_SPEC_CACHE=/tmp/pcache PYTHONPATH=/tmp/site:$PWD/src
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
SCALE=${SCALE:-full}   # "mini" for a dry run on the CPU
