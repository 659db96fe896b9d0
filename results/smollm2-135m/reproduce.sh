#!/usr/bin/env bash
# Trained drafters for the default target (SmolLM2-135M-Instruct) and their benchmarks, on CPU.
#
# Data: prompts from ../shared/data/train answered by the target itself (greedy, bf16), so the
# drafters learn the target's own distribution. The answered file is committed
# (data/smollm2-regenerated.jsonl); `regen` rebuilds or extends it (resumable, shuffled order:
# the first N lines are a balanced sample of all 21 training files).
# Every drafter sees the same data and the same number of optimizer steps ($STEPS).
#
# The committed runs (results/README.md has the index): the first block on the 2-vCPU Intel Xeon VM,
# the GPU steps on one H200, every other step on the 2-vCPU AMD EPYC VM, all on 2026-11-26.
#   bash results/smollm2-135m/reproduce.sh regen            # answer the prompts (~1.8 s/reply at batch 16 on 2 cores)
#   bash results/smollm2-135m/reproduce.sh features         # capture the target's features once
#   bash results/smollm2-135m/reproduce.sh eagle2|hass|prism|prism3|prism-star|stacked2|standard
#   bash results/smollm2-135m/reproduce.sh scaling [25|50]  # HASS and PRISM on 25 % and 50 % of the data
#   bash results/smollm2-135m/reproduce.sh bench|bench-fp32|bench-ablations|bench-cpu  # tables, summaries, figures
#   bash results/smollm2-135m/reproduce.sh profile         # per-phase time of a decode round
# On a lent H200 (2026-11-26, see results/gpu-h200/README.md), then benchmarked on the CPU:
#   bash results/smollm2-135m/reproduce.sh regen-gpu       # 13,006 prompts, batch 384 (H200: ~48 replies/s)
#   bash results/smollm2-135m/reproduce.sh prism-gpu       # PRISM on both answer files (H200: < 150 s)
#   bash results/smollm2-135m/reproduce.sh bench-gpu-prism # CPU: fp32 paper-tree AL and bf16 speed with --tree auto
#   bash results/smollm2-135m/reproduce.sh packing         # CPU: prepacked vs plain linear layers, CPU table again
#   bash results/smollm2-135m/reproduce.sh prism-star-norm # PRISM* with RMS-normalised input layers (~15 min)
#   bash results/smollm2-135m/reproduce.sh bench-star-norm # its float32 paper-tree AL next to PRISM and the old PRISM*
# CPU only (2026-11-26):
#   bash results/smollm2-135m/reproduce.sh prism-ft        # the GPU-trained PRISM fine-tuned on ~26k conversations (~57 min)
#   bash results/smollm2-135m/reproduce.sh bench-ft        # fp32 paper-tree AL and bf16 --tree auto speed, before / after
#   bash results/smollm2-135m/reproduce.sh prism-ft2       # a second pass from prism-ft (~34 min); now the packaged drafter
#   bash results/smollm2-135m/reproduce.sh bench-ft2       # fp32 paper-tree AL of the two passes
#   bash results/smollm2-135m/reproduce.sh bench-cpu-ft2   # bf16 CPU speed of the two passes (--tree auto, then 4/0/3; archived)
#   bash results/smollm2-135m/reproduce.sh attention       # grouped-query SDPA without the KV copy: forward latency, A/B
#   bash results/smollm2-135m/reproduce.sh bench-cpu-packaged   # bf16 CPU speed, --tree auto with the eight-prompt calibration set
#   bash results/smollm2-135m/reproduce.sh bench-cpu-baselines  # the same runtime for the baselines (equal training) and the packaged PRISM
# CPU only (2026-12-05, 2-vCPU AMD EPYC VM):
#   bash results/smollm2-135m/reproduce.sh prism-ft3       # prism-ft2 fine-tuned on the target's own corpus, shards 0-19
#   bash results/smollm2-135m/reproduce.sh bench-ft3       # fp32 paper-tree AL of prism-ft2 and prism-ft3, 128 new tokens
# The canonical summary of the current drafters (summary.json; LIMIT questions per benchmark, default 20):
# the packaged PRISM and the campaign's EAGLE-2, HASS and PRISM of its last finished level (or LEVEL)
#   LIMIT=N bash results/smollm2-135m/reproduce.sh summary
# Ship a campaign level's PRISM as the packaged drafter (default: the last finished level):
#   LEVEL=L bash results/smollm2-135m/reproduce.sh ship
# The equal-budget campaign on the target's own corpus (docs/gpu-campaign.md; resumable, any machine):
#   SECONDS_BUDGET=S bash results/smollm2-135m/reproduce.sh campaign   # train on within S seconds
#   LEVEL=L LIMIT=N bash results/smollm2-135m/reproduce.sh curves      # AL of level L, then the learning-curve figure
#   bash results/smollm2-135m/reproduce.sh data-mix        # own replies only vs dataset answers mixed in (EAGLE-2, equal budget)
#   bash results/smollm2-135m/reproduce.sh levers          # learning rate, batch size, drafter layer copied from the target (EAGLE-2, equal budget)
#   bash results/smollm2-135m/reproduce.sh tuning-levers   # PRISM tuning rate and re-warm, HASS going on (from the level-0 HASS snapshot)
#   LIMIT=N bash results/smollm2-135m/reproduce.sh replay  # T=0 AL of the current drafters replayed (no decoding), N questions
# Runs superseded by a later run of the same measurement are kept under results/archive/smollm2-135m
# (results/archive/README.md); the commands that made them write there.
set -euo pipefail
cd "$(dirname "$0")/../.."
RUNS=${RUNS:-runs/smollm2-135m}
OUT=results/smollm2-135m
ARCHIVE=results/archive/smollm2-135m   # superseded runs (results/archive/README.md)
DATA=$OUT/data/smollm2-regenerated.jsonl
N_EXAMPLES=${N_EXAMPLES:-1200}   # answered conversations used (train + 48 held out)
STEPS=${STEPS:-320}              # optimizer steps per drafter (PRISM: 3/4 warmup + 1/4 tuning)
LR=2e-4                          # short-budget learning rate (the paper's 3e-5 is for tens of epochs)
WARMUP=$((STEPS * 3 / 4))
COMMON=(--target smollm2-135m --data "$DATA" --max-length 384 --batch-size 8
        --mixed-precision bf16 --save-dtype bf16 --feature-cache "$RUNS/features"
        --set data.max_examples=$N_EXAMPLES --set data.holdout=48 --set drafter.draft_vocab_size=16384
        --set data.dedupe=false  # these runs predate de-duplication (now the default)
        --checkpoint-every 50 --eval-every 100 --log-every 10)
STAR=(--feature-cache "$RUNS/features-star")   # PRISM* also needs low/middle/high layer features
DRAFTERS=(--method eagle2=$OUT/drafters/eagle2 --method hass=$OUT/drafters/hass --method prism=$OUT/drafters/prism)

finish() {  # keep the 16-bit drafter and its training log under results/
  local name=$1 run=${2:-$1}
  rm -rf "$OUT/drafters/$name" && mkdir -p "$(dirname "$OUT/drafters/$name")"
  cp -r "$RUNS/$run/drafter" "$OUT/drafters/$name"
  cp "$RUNS/$run/train_log.jsonl" "$RUNS/$run/train_config.json" "$OUT/drafters/$name/"
}

packaged_weights() {  # earlier packaged drafters' weights from git history (the commits that shipped them)
  local name commit
  for name in prism-gpu:e890d8c prism-ft:0a7c96a prism-ft2:61816e4; do
    commit=${name#*:}; name=${name%%:*}
    [ -f "$OUT/drafters/$name/model.safetensors" ] && continue
    # Through a temporary file: a failed git show (a shallow clone lacks the commit) leaves nothing behind.
    git show "$commit:src/prism_spec/assets/drafters/smollm2-135m-prism/model.safetensors" \
      > "$OUT/drafters/$name/model.safetensors.tmp" || {
        rm -f "$OUT/drafters/$name/model.safetensors.tmp"
        echo "cannot restore $name's weights from commit $commit (a shallow clone? git fetch --unshallow)" >&2
        exit 1; }
    mv "$OUT/drafters/$name/model.safetensors.tmp" "$OUT/drafters/$name/model.safetensors"
  done
}

campaign_last_level() {  # the campaign's last finished level
  python -c "import json, sys; print(len(json.load(open(sys.argv[1]))['levels']) - 1)" $OUT/campaign/campaign.json
}

fine_tune() {  # the packaged drafter's fine-tuning runs: extra args (output dir, init, steps, lr, ...)
  local S=${SHARED_TRAIN:-../shared/data/train}
  python -m prism_spec.train --recipe prism --target smollm2-135m --online --dtype bf16 \
    --data "$S/gsm8k_train.jsonl" "$S/math_test.jsonl" "$S/code_alpaca_2k.json" "$S/gpteacher_codegen.json" \
      "$S/gpteacher_roleplay.json" "$S/mbpp.jsonl" "$S/self_instruct_user_oriented_instructions.jsonl" \
      "$S/t0_subset/cnn_dailymail_3_0_0_news_summary.jsonl" "$S/t0_subset/xsum_summarize_DOC.jsonl" \
      "$S/t0_subset/samsum_Summarize_.jsonl" "$OUT/data/smollm2-regenerated-gpu.jsonl" "$DATA" \
    --max-length 384 --batch-size 16 --mixed-precision bf16 --save-dtype bf16 \
    --set drafter.draft_vocab_size=16384 --set data.holdout=100 --set stages.warmup.enabled=false \
    --checkpoint-every 100 --resume "$@"
}

train_prism() {  # name, extra args...
  local name=$1; shift
  python -m prism_spec.train "${COMMON[@]}" --output-dir "$RUNS/$name" "$@" \
    --set stages.warmup.steps=$WARMUP --set stages.warmup.lr=$LR \
    --set stages.tuning.steps=$((STEPS - WARMUP)) --set stages.tuning.lr=2e-5 --resume
}

case "${1:-}" in
  regen)
    python scripts/prepare_smollm2_data.py --out "$DATA" --dtype bfloat16 ;;
  features)
    python -m prism_spec.train --recipe eagle2 "${COMMON[@]}" --output-dir "$RUNS/features-job" --capture-only
    python -m prism_spec.train --recipe 'prism*' "${COMMON[@]}" "${STAR[@]}" --output-dir "$RUNS/features-star-job" \
      --capture-only ;;
  eagle2)
    python -m prism_spec.train --recipe eagle2 "${COMMON[@]}" --output-dir "$RUNS/eagle2" \
      --set stages.eagle.steps=$STEPS --set stages.eagle.lr=$LR --resume
    finish eagle2 ;;
  hass)
    python -m prism_spec.train --recipe hass "${COMMON[@]}" --output-dir "$RUNS/hass" \
      --set stages.hass.steps=$STEPS --set stages.hass.lr=$LR --resume
    finish hass ;;
  stacked2)
    python -m prism_spec.train --recipe stacked2 "${COMMON[@]}" --output-dir "$RUNS/stacked2" \
      --set stages.hass2.steps=$STEPS --set stages.hass2.lr=$LR --resume
    finish stacked2 ;;
  prism)
    train_prism prism --recipe prism
    finish prism ;;
  prism3)
    train_prism prism3 --recipe prism --set drafter.num_modules=3 --set drafter.step_mapping=0,1,2
    finish prism3 ;;
  prism-star)
    train_prism prism-star --recipe 'prism*' "${STAR[@]}"
    finish prism-star ;;
  standard)  # the target's first 2 layers + its LM head, distilled (full vocabulary, no features)
    python -m prism_spec.train --recipe standard "${COMMON[@]}" --set drafter.draft_vocab_size=null \
      --output-dir "$RUNS/standard" --set stages.distill.steps=$STEPS --set stages.distill.lr=1e-4 --resume
    finish standard ;;
  scaling)  # same epochs on less data: 25 % / 50 % of the examples, 25 % / 50 % of the steps
    for pct in ${2:-25 50}; do
      n=$((N_EXAMPLES * pct / 100)); s=$((STEPS * pct / 100))
      python -m prism_spec.train --recipe hass "${COMMON[@]}" --set data.max_examples=$n \
        --feature-cache "$RUNS/features-$pct" --output-dir "$RUNS/hass-$pct" --set stages.hass.steps=$s --set stages.hass.lr=$LR --resume
      finish "scaling/hass-$pct" "hass-$pct"
      STEPS=$s WARMUP=$((s * 3 / 4)) train_prism "prism-$pct" --recipe prism --set data.max_examples=$n \
        --feature-cache "$RUNS/features-$pct"
      finish "scaling/prism-$pct" "prism-$pct"
    done ;;
  bench)  # acceptance length, six benchmarks, T=0 and T=1, the paper's tree
    prism bench --method vanilla --method standard=$OUT/drafters/standard "${DRAFTERS[@]}" \
      --method 'prism*@prism-star'=$OUT/drafters/prism-star \
      --temperature 0 --temperature 1 --tree paper --limit "${LIMIT:-1}" --max-new-tokens 64 --threads "${THREADS:-2}" \
      --dtype bfloat16 --out "$OUT/bench-paper-tree" ;;
  bench-fp32)  # T=0 in float32: acceptance length and the token-for-token check against vanilla greedy
    prism bench --method vanilla --method standard=$OUT/drafters/standard "${DRAFTERS[@]}" \
      --method 'prism*@prism-star'=$OUT/drafters/prism-star \
      --temperature 0 --tree paper --limit "${LIMIT:-1}" --max-new-tokens 64 --threads "${THREADS:-2}" \
      --dtype float32 --out "$OUT/bench-paper-tree-fp32" ;;
  bench-ablations)  # T=0 only (deterministic: PRISM and HASS rows are those of `bench`): M=3, stacking, data scaling
    prism bench --method prism@prism3=$OUT/drafters/prism3 --method stacked@stacked2=$OUT/drafters/stacked2 \
      --method hass@hass-25=$OUT/drafters/scaling/hass-25 --method hass@hass-50=$OUT/drafters/scaling/hass-50 \
      --method prism@prism-25=$OUT/drafters/scaling/prism-25 --method prism@prism-50=$OUT/drafters/scaling/prism-50 \
      --temperature 0 --tree paper --limit "${LIMIT:-1}" --max-new-tokens 64 --threads "${THREADS:-2}" \
      --dtype bfloat16 --out "$OUT/bench-ablations" ;;
  bench-cpu)  # speed on this CPU: bf16 target (vanilla too), each drafter's tree tuned here (--tree auto)
    prism bench --method vanilla --method standard=$OUT/drafters/standard "${DRAFTERS[@]}" \
      --method 'prism*@prism-star'=$OUT/drafters/prism-star \
      --dtype bfloat16 --temperature 0 --tree "${TREE:-auto}" --limit "${LIMIT:-1}" --max-new-tokens 64 \
      --threads 2 --out "$OUT/bench-cpu-tree" ;;
  profile)  # where a round's time goes (PRISM, bf16, cpu tree)
    python benchmarks/profile_round.py --dtype bfloat16 --tree cpu --prompts 4 --max-new-tokens 64 --threads 2 \
      --drafter $OUT/drafters/prism --json results/cpu/profile_round_bf16.json ;;
  regen-gpu)  # the committed file holds the first 3,456 answers (shortest prompts first; a 100 s limit)
    python scripts/prepare_smollm2_data.py --out "$OUT/data/smollm2-regenerated-gpu.jsonl" --per-file 900 --seed 1 \
      --max-prompt-chars 3000 --batch-size 384 --dtype bfloat16 ;;
  prism-gpu)
    python -m prism_spec.train --recipe prism --target smollm2-135m --online \
      --data "$OUT/data/smollm2-regenerated-gpu.jsonl" "$DATA" --output-dir "$RUNS/prism-gpu" \
      --max-length 384 --batch-size 32 --mixed-precision bf16 --save-dtype bf16 \
      --set drafter.draft_vocab_size=16384 --set data.holdout=200 --set data.dedupe=false \
      --set stages.warmup.steps=700 --set stages.warmup.lr=2e-4 --set stages.tuning.steps=200 --set stages.tuning.lr=2e-5 \
      --checkpoint-every 0 --eval-every 300 --log-every 25 --resume
    finish prism-gpu ;;
  bench-gpu-prism)  # prism-gpu's weights: the packaged drafter's until commit 0a7c96a (git history)
    packaged_weights
    prism bench --method vanilla --method prism@prism-gpu=$OUT/drafters/prism-gpu --method prism=$OUT/drafters/prism \
      --temperature 0 --tree paper --limit "${LIMIT:-1}" --max-new-tokens 64 --threads 2 --dtype float32 \
      --out "$OUT/bench-paper-tree-fp32-gpu-prism"
    # The CPU speed run below predates prepacked weights (the default since; add --no-packed-weights to
    # repeat its setting); `packing` runs the same bench with the default into $OUT/bench-cpu-packed.
    prism bench --method vanilla --method eagle2=$OUT/drafters/eagle2 --method prism=$OUT/drafters/prism \
      --method prism@prism-gpu=$OUT/drafters/prism-gpu --dtype bfloat16 --temperature 0 --tree auto \
      --limit "${LIMIT:-1}" --max-new-tokens 64 --threads 2 --out "$ARCHIVE/bench-cpu-plain-weights" ;;
  prism-star-norm)  # PRISM* with each input layer RMS-normalised (drafter.input_norm, now the default)
    train_prism prism-star-norm --recipe 'prism*' "${STAR[@]}"
    finish prism-star-norm ;;
  bench-star-norm)  # float32 paper tree: PRISM, PRISM* before and after the input normalisation
    prism bench --method vanilla --method prism=$OUT/drafters/prism --method 'prism*@prism-star'=$OUT/drafters/prism-star \
      --method 'prism*@prism-star-norm'=$OUT/drafters/prism-star-norm \
      --temperature 0 --tree paper --limit "${LIMIT:-1}" --max-new-tokens 64 --threads "${THREADS:-2}" \
      --dtype float32 --out "$OUT/bench-paper-tree-fp32-star-norm"
    packaged_weights
    prism bench --method vanilla --method 'prism*@prism-star-norm'=$OUT/drafters/prism-star-norm \
      --method prism@prism-gpu=$OUT/drafters/prism-gpu --dtype bfloat16 --temperature 0 --tree auto \
      --limit "${LIMIT:-1}" --max-new-tokens 64 --threads 2 --out "$OUT/bench-cpu-star-norm" ;;
  packing)  # prepacked CPU weights (docs/performance.md), then the CPU table again
    python benchmarks/linear_packing.py --json results/cpu/linear_packing_amd.json
    python benchmarks/target_latency.py --json results/cpu/target_latency_amd_packed.json --wait-idle 30
    python benchmarks/runtime_ab.py --tree 4/0/3 --json results/cpu/packing_ab_bf16_4-0-3.json
    python benchmarks/runtime_ab.py --dtype float32 --tree 8/1/3 --repeats 2 --json results/cpu/packing_ab_fp32_8-1-3.json
    python benchmarks/cpu_decode_options.py --json results/cpu/cpu_decode_options_amd.json
    for weights in plain packed; do
      flag=""; [ "$weights" = plain ] && flag=--no-packed-weights
      python benchmarks/profile_round.py --dtype bfloat16 --tree 8/1/3 --prompts 4 --max-new-tokens 64 --threads 2 \
        --drafter auto $flag --json "results/cpu/profile_round_bf16_$weights.json"
    done
    packaged_weights
    prism bench --method vanilla --method eagle2=$OUT/drafters/eagle2 --method prism=$OUT/drafters/prism \
      --method prism@prism-gpu=$OUT/drafters/prism-gpu --dtype bfloat16 --temperature 0 --tree auto \
      --limit "${LIMIT:-1}" --max-new-tokens 64 --threads 2 --out "$OUT/bench-cpu-packed" ;;
  prism-ft)  # fine-tune the GPU-trained PRISM, CE-only tuning stage on both modules,
    # on the dataset answers of ten training files (target soft labels; not regenerated) plus both answer files
    packaged_weights
    fine_tune --output-dir "$RUNS/prism-ft-mixed" --init-from "$OUT/drafters/prism-gpu" \
      --set stages.tuning.steps=560 --set stages.tuning.lr=8e-5 --eval-every 200 --log-every 20
    finish prism-ft prism-ft-mixed ;;
  prism-ft2)  # a second pass from prism-ft, another data order (same held-out split)
    packaged_weights
    fine_tune --output-dir "$RUNS/prism-ft2-mixed" --init-from "$OUT/drafters/prism-ft" \
      --set stages.tuning.steps=330 --set stages.tuning.lr=5e-5 --seed 1 --eval-every 165 --log-every 15
    finish prism-ft2 prism-ft2-mixed ;;
  prism-ft3)  # a third pass from prism-ft2, on the target's own greedy corpus (shards 0-19: 5,120 replies)
    packaged_weights
    snapshot=$RUNS/corpus-shards-0-19   # a fixed copy: the corpus folder grows while its job runs
    mkdir -p "$snapshot" && cp "$OUT/corpus/corpus.json" "$OUT/corpus/prompts.npz" "$snapshot/"
    for i in $(seq -f "%05g" 0 19); do cp "$OUT/corpus/shard-$i.npz" "$OUT/corpus/shard-$i.json" "$snapshot/"; done
    python -m prism_spec.train --recipe prism --target smollm2-135m --online --dtype float32 --mixed-precision no \
      --data "$snapshot" --max-length 512 --batch-size 16 --save-dtype bf16 --seed 2 \
      --set drafter.draft_vocab_size=16384 --set data.holdout=100 --set data.group_by_length=true \
      --set stages.warmup.enabled=false --init-from "$OUT/drafters/prism-ft2" \
      --set stages.tuning.steps="${FT3_STEPS:-200}" --set stages.tuning.lr=5e-5 \
      --checkpoint-every 25 --eval-every 100 --log-every 10 --output-dir "$RUNS/prism-ft3-corpus" --resume
    finish prism-ft3 prism-ft3-corpus ;;
  bench-ft3)  # fp32 paper-tree AL: the packaged drafter (prism-ft2) and its corpus pass (prism-ft3), 128 new tokens
    packaged_weights
    prism bench --method vanilla --method prism@prism-ft2=$OUT/drafters/prism-ft2 --method prism@prism-ft3=$OUT/drafters/prism-ft3 \
      --temperature 0 --tree paper --limit "${LIMIT:-5}" --max-new-tokens 128 --threads 2 --dtype float32 \
      --out "$OUT/bench-paper-tree-fp32-corpus-fine-tuning" ;;
  summary)  # the canonical summary of the current drafters: results/smollm2-135m/summary.json
    # The packaged PRISM and the campaign's equal-budget EAGLE-2, HASS and PRISM (its last finished level, or
    # LEVEL), T=0 and T=1, float32, paper tree, 128 new tokens, LIMIT questions per benchmark (resumable: a
    # larger LIMIT adds questions to the same run). The folder is named by the level and the packaged
    # weights' hash, so new drafters start afresh.
    packaged=src/prism_spec/assets/drafters/smollm2-135m-prism
    level=${LEVEL:-$(campaign_last_level)}
    bench_dir=$OUT/bench-summary-L$level-$(sha256sum "$packaged/model.safetensors" | cut -c1-8)
    prism bench --method vanilla --method eagle2=$OUT/campaign/levels/L$level/eagle2 \
      --method hass=$OUT/campaign/levels/L$level/hass --method prism=$OUT/campaign/levels/L$level/prism \
      --method prism@packaged=$packaged \
      --temperature 0 --temperature 1 --tree paper --limit "${LIMIT:-20}" --max-new-tokens 128 \
      --threads "${THREADS:-2}" --dtype float32 --out "$bench_dir" --resume
    python scripts/bench_summary.py "$bench_dir" "$OUT/summary.json" \
      --command "LIMIT=${LIMIT:-20} LEVEL=$level bash results/smollm2-135m/reproduce.sh summary" ;;
  bench-ft)  # the packaged PRISM before (prism-gpu) and after (prism-ft) its first fine-tuning pass
    packaged_weights
    prism bench --method vanilla --method prism@prism-gpu=$OUT/drafters/prism-gpu --method prism@prism-ft=$OUT/drafters/prism-ft \
      --temperature 0 --tree paper --limit "${LIMIT:-5}" --max-new-tokens 64 --threads 2 --dtype float32 \
      --out "$OUT/bench-paper-tree-fp32-gpu-trained-vs-fine-tuned"
    prism bench --method vanilla --method prism@prism-gpu=$OUT/drafters/prism-gpu --method prism@prism-ft=$OUT/drafters/prism-ft \
      --dtype bfloat16 --temperature 0 --tree auto --limit "${LIMIT:-5}" --max-new-tokens 64 --threads 2 \
      --out "$OUT/bench-cpu-gpu-trained-vs-fine-tuned"
    prism bench --method vanilla --method prism@prism-gpu=$OUT/drafters/prism-gpu --method prism@prism-ft=$OUT/drafters/prism-ft \
      --dtype bfloat16 --temperature 0 --tree 4/0/3 --limit "${LIMIT:-5}" --max-new-tokens 64 --threads 2 \
      --out "$OUT/bench-cpu-gpu-trained-vs-fine-tuned-tree-4-0-3" ;;
  bench-ft2)  # the first and the second fine-tuning pass (prism-ft2 is the packaged drafter since)
    packaged_weights
    prism bench --method vanilla --method prism@prism-ft=$OUT/drafters/prism-ft --method prism@prism-ft2=$OUT/drafters/prism-ft2 \
      --temperature 0 --tree paper --limit "${LIMIT:-5}" --max-new-tokens 64 --threads 2 --dtype float32 \
      --out "$OUT/bench-paper-tree-fp32-fine-tuning-passes" ;;
  bench-cpu-ft2)  # CPU speed of the packaged drafter (prism-ft2) beside the first pass, bf16, with the tuner
    # that estimated round costs (superseded by bench-cpu-packaged: the tuner that times real rounds)
    packaged_weights
    prism bench --method vanilla --method prism@prism-ft=$OUT/drafters/prism-ft --method prism@prism-ft2=$OUT/drafters/prism-ft2 \
      --dtype bfloat16 --temperature 0 --tree auto --limit "${LIMIT:-5}" --max-new-tokens 64 --threads 2 \
      --out "$ARCHIVE/bench-cpu-fine-tuning-passes-old-tuner"
    prism bench --method vanilla --method prism@prism-ft=$OUT/drafters/prism-ft --method prism@prism-ft2=$OUT/drafters/prism-ft2 \
      --dtype bfloat16 --temperature 0 --tree 4/0/3 --limit "${LIMIT:-5}" --max-new-tokens 64 --threads 2 \
      --out "$ARCHIVE/bench-cpu-fine-tuning-passes-old-tuner-tree-4-0-3" ;;
  attention)  # prism_sdpa against transformers' sdpa (docs/performance.md)
    python benchmarks/gqa_attention.py --json results/cpu/gqa_attention_bf16.json
    python benchmarks/runtime_ab.py --compare attention --bench sum --prompts 5 --repeats 2 --tree 4/0/3 \
      --json results/cpu/attention_ab_sum_bf16_4-0-3.json
    python benchmarks/runtime_ab.py --compare attention --bench sum --prompts 5 --repeats 2 --tree 10/1/6 \
      --json results/cpu/attention_ab_sum_bf16_10-1-6.json
    python benchmarks/runtime_ab.py --compare attention --bench mt_bench --prompts 5 --repeats 2 --tree 4/0/3 \
      --json results/cpu/attention_ab_mt_bench_bf16_4-0-3.json ;;
  bench-cpu-packaged)  # the two fine-tuned drafters with --tree auto, tuned on the 8-prompt calibration set
    packaged_weights
    prism bench --method vanilla --method prism@prism-ft=$OUT/drafters/prism-ft --method prism@prism-ft2=$OUT/drafters/prism-ft2 \
      --dtype bfloat16 --temperature 0 --tree auto --limit "${LIMIT:-5}" --max-new-tokens 64 --threads 2 \
      --out "$OUT/bench-cpu-packaged-prism" ;;
  bench-cpu-baselines)  # the equal-budget EAGLE-2, HASS and PRISM (same data and budget) + the packaged PRISM
    packaged_weights
    prism bench --method vanilla "${DRAFTERS[@]}" --method prism@packaged=$OUT/drafters/prism-ft2 \
      --dtype bfloat16 --temperature 0 --tree auto --limit "${LIMIT:-5}" --max-new-tokens 64 --threads 2 \
      --out "$OUT/bench-cpu-baselines-and-packaged" ;;
  campaign)  # the next segments of the equal-budget campaign (float32 on CPUs without bf16 instructions)
    precision=config; grep -q avx512_bf16 /proc/cpuinfo || precision=float32
    [ "$(python -c 'import torch; print(torch.cuda.is_available())')" = True ] && precision=config
    python -m prism_spec.train.campaign run $OUT/campaign --time-budget "${SECONDS_BUDGET:-7200}" --precision $precision
    python -m prism_spec.train.campaign status $OUT/campaign ;;
  ship)  # a campaign level's PRISM (default: the last finished) becomes the packaged drafter, with its provenance README
    python -m prism_spec.train.campaign export $OUT/campaign --method prism ${LEVEL:+--level $LEVEL} \
      -o src/prism_spec/assets/drafters/smollm2-135m-prism ;;
  curves)  # AL of a finished level (default: the last) on the paper tree, T=0 and T=1, then the figure
    python -m prism_spec.train.campaign eval $OUT/campaign ${LEVEL:+--level $LEVEL} --questions "${LIMIT:-20}" \
      --temperature 0 --temperature 1 --threads "${THREADS:-2}"
    python -m prism_spec.train.campaign plot $OUT/campaign -o $OUT/campaign/learning_curves.png ;;
  curves-replay)  # the CPU's way: a finished level's AL replayed (paper tree T=0 and T=1, CPU tree T=0), then the figure
    for shape in "--tree paper --temperature 0 --temperature 1" "--tree cpu"; do
      python -m prism_spec.train.campaign eval $OUT/campaign ${LEVEL:+--level $LEVEL} --replay $shape \
        --questions "${LIMIT:-5}" --threads "${THREADS:-2}"
    done
    python -m prism_spec.train.campaign plot $OUT/campaign -o $OUT/campaign/learning_curves.png ;;
  data-mix)  # does mixing the datasets' own answers into the target's replies help, at equal budget? (recipe LR 3e-5)
    T=../shared/data/train
    MIX=$OUT/corpus,$T/gsm8k_train.jsonl,$T/math_test.jsonl,$T/code_alpaca_2k.json,$T/gpteacher_codegen.json,$T/gpteacher_roleplay.json,$T/mbpp.jsonl,$T/self_instruct_seed_tasks.jsonl,$T/t0_subset/cnn_dailymail_3_0_0_news_summary.jsonl,$T/t0_subset/xsum_summarize_DOC.jsonl,$T/t0_subset/samsum_Summarize_.jsonl
    python benchmarks/train_levers.py --corpus $OUT/corpus --train-shards 0:56 --eval-shards 56 --lr 3e-5 \
      --variant "target replies only" --variant "target replies + dataset answers: data.paths=$MIX" \
      --steps 120 --batch-size 8 --max-length 512 --threads "${THREADS:-1}" --json results/cpu/data_mix_eagle2_intel.json ;;
  levers)  # learning rate, batch size, a drafter layer copied from the target (EAGLE-2, equal budget: 1,920 examples)
    L="python benchmarks/train_levers.py --corpus $OUT/corpus --train-shards 0:56 --eval-shards 56 --eval-examples 128
       --max-length 512 --threads ${THREADS:-2} --features runs/levers-features --keep runs/levers"
    $L --steps 240 --batch-size 8 --variant "lr 2e-4" --variant "lr 6e-4: lr=6e-4" --variant "lr 1.2e-3: lr=1.2e-3" \
      --variant "layer copy, lr 2e-4: drafter.init_from_target_layer=-1" \
      --variant "layer copy, lr 6e-4: drafter.init_from_target_layer=-1 lr=6e-4" --json results/cpu/train_levers_eagle2_intel.json
    $L --steps 240 --batch-size 8 --variant "lr 2.4e-3: lr=2.4e-3" --variant "lr 4.8e-3: lr=4.8e-3" \
      --variant "lr 4.8e-3, warm-up 10%: lr=4.8e-3 warmup_ratio=0.1" --json results/cpu/train_levers_eagle2_lr_intel.json
    $L --steps 60 --batch-size 32 --variant "batch 32, lr 1.2e-3: lr=1.2e-3" --variant "batch 32, lr 2.4e-3: lr=2.4e-3" \
      --variant "batch 32, lr 4.8e-3: lr=4.8e-3" --json results/cpu/train_levers_eagle2_batch32_intel.json
    python benchmarks/replay_al.py --method "lr 2e-4=runs/levers/lr-2e-4" --method "lr 6e-4=runs/levers/lr-6e-4" \
      --method "lr 1.2e-3=runs/levers/lr-1.2e-3" --method "lr 2.4e-3=runs/levers/lr-2.4e-3" --questions 5 \
      --max-new-tokens 128 --tree paper --store $OUT/replay/continuations-float32.jsonl --threads 1 \
      --json results/cpu/train_levers_eagle2_replay_5q_paper_fp32.json ;;
  hass-levers)  # HASS's aligned steps and their loss weights (from scratch, the EAGLE-2 lever study's batches and budget)
    L="python benchmarks/train_levers.py --recipe hass --corpus $OUT/corpus --train-shards 0:56 --eval-shards 56
       --eval-examples 128 --max-length 512 --threads ${THREADS:-1} --features runs/levers-features --keep runs/levers-hass
       --steps 240 --batch-size 8 --lr 1.2e-3"
    R="python benchmarks/replay_al.py --questions 5 --max-new-tokens 128 --tree paper
       --store $OUT/replay/continuations-float32.jsonl --threads 1"
    $L --variant "HASS" --variant "HASS, step weights 1/0.5/0.25: step_weights=[1.0,0.5,0.25]" \
      --variant "HASS, 2 aligned steps: aligned_steps=2" --json results/cpu/train_levers_hass_intel.json
    $R --method "HASS=runs/levers-hass/HASS" --method "HASS, step weights 1/0.5/0.25=runs/levers-hass/HASS-step-weights-1-0.5-0.25" \
      --method "HASS, 2 aligned steps=runs/levers-hass/HASS-2-aligned-steps" --json results/cpu/train_levers_hass_replay_5q_paper_fp32.json
    $L --variant "HASS, step weights 1/0.25/0.0625: step_weights=[1.0,0.25,0.0625]" \
      --variant "HASS, 2 aligned steps, weights 1/0.5: aligned_steps=2 step_weights=[1.0,0.5]" \
      --json results/cpu/train_levers_hass_weights_intel.json
    $R --method "HASS, step weights 1/0.25/0.0625=runs/levers-hass/HASS-step-weights-1-0.25-0.0625" \
      --method "HASS, 2 aligned steps, weights 1/0.5=runs/levers-hass/HASS-2-aligned-steps-weights-1-0.5" \
      --json results/cpu/train_levers_hass_weights_replay_5q_paper_fp32.json ;;
  tuning-levers)  # PRISM's tuning stage (lr, re-warm) and HASS going on, from the campaign's level-0 HASS snapshot
    S=$OUT/levers/L0-hass-snapshot  # kept from the campaign (drafters/hass-snapshot after level 0's 192 steps)
    python -c "import sys; from pathlib import Path; from prism_spec.train.campaign import hass_to_prism; \
hass_to_prism(Path(sys.argv[1]), Path(sys.argv[2]))" $S runs/prism-tuning/prism-init
    L="python benchmarks/train_levers.py --corpus $OUT/corpus --train-shards 0:59 --eval-shards 66 --eval-examples 128
       --steps 64 --batch-size 8 --max-length 1024 --threads ${THREADS:-1} --keep runs/prism-tuning/drafters"
    T="init_from=runs/prism-tuning/prism-init stages.warmup.enabled=false"
    $L --recipe prism --features runs/prism-tuning/features-prism \
      --variant "PRISM tuning lr 1.2e-4, no re-warm: $T lr=1.2e-4 rewarm_steps=0" --variant "PRISM tuning lr 1.2e-4: $T lr=1.2e-4" \
      --variant "PRISM tuning lr 4e-4: $T lr=4e-4" --variant "PRISM tuning lr 1.2e-3: $T lr=1.2e-3" \
      --variant "PRISM tuning lr 4e-4, no re-warm: $T lr=4e-4 rewarm_steps=0" --json results/cpu/train_levers_prism_tuning_intel.json
    $L --recipe prism --features runs/prism-tuning/features-prism --steps 0 --start runs/prism-tuning/prism-init \
      --variant "start: stages.warmup.enabled=false" --json results/cpu/train_levers_prism_tuning_start_intel.json
    $L --recipe hass --features runs/prism-tuning/features-hass \
      --variant "HASS lr 1.2e-3, no re-warm: init_from=$S lr=1.2e-3 rewarm_steps=0" --variant "HASS lr 1.2e-3: init_from=$S lr=1.2e-3" \
      --json results/cpu/train_levers_hass_continued_intel.json ;;
  replay)  # T=0 AL, paper tree, float32, replayed from stored greedy continuations (docs/bench.md)
    python benchmarks/replay_al.py --method packaged=auto --method eagle2=$OUT/drafters/eagle2 \
      --method hass=$OUT/drafters/hass --method prism=$OUT/drafters/prism --questions "${LIMIT:-5}" \
      --max-new-tokens 128 --tree paper --store $OUT/replay/continuations-float32.jsonl --threads "${THREADS:-1}" \
      --json $OUT/replay/replay_al_${LIMIT:-5}q_paper_fp32.json ;;
  *)
    echo "usage: $0 regen|features|eagle2|hass|prism|prism3|prism-star|stacked2|standard|scaling|bench|bench-fp32|bench-ablations|bench-cpu|profile|regen-gpu|prism-gpu|bench-gpu-prism|packing|prism-star-norm|bench-star-norm|prism-ft|prism-ft2|bench-ft|bench-ft2|bench-cpu-ft2|attention|bench-cpu-packaged|bench-cpu-baselines|summary|ship|campaign|curves|curves-replay|data-mix|levers|hass-levers|tuning-levers|replay" >&2
    exit 2 ;;
esac
