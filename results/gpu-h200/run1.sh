# Device call 1: keep the first half of the target for call 2; smoke test; 7B-shape cost model.
# device-carry/: what the device call carried beside the working tree: env.sh (beside this file), the
# default target's GGUF in two halves (partA, partB), the wheels the machine lacked (whl/), the prompts.
set -x
. device-carry/env.sh
[ -f device-carry/partA ] && cp device-carry/partA /tmp/partA
[ -d device-carry/prompts ] && cp -r device-carry/prompts /tmp/prompts
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee -a $OUT/run1.log
python3 -c "import torch, transformers; print(torch.__version__, transformers.__version__, torch.cuda.is_available())" 2>&1 | tee -a $OUT/run1.log
timeout 100 python3 benchmarks/gpu_speed.py smoke --json $OUT/smoke.json 2>&1 | tee -a $OUT/run1.log
timeout 120 python3 -m pytest -q -p no:cacheprovider -o addopts="" tests/runtime/test_decode.py -k cuda 2>&1 | tail -15 | tee -a $OUT/run1.log
if [ "$SCALE" = mini ]; then S7="--layers 1 --sizes 1 8 --repeats 2 --modes eager static"; else S7=""; fi
timeout 200 python3 benchmarks/gpu_speed.py shape7b --trees paper cpu chain:3 --max-new-tokens 64 \
  --modes eager graphs $S7 --json $OUT/shape7b.json 2>&1 | tee -a $OUT/run1.log
ls -la /tmp/partA
