#!/usr/bin/env bash
# GRPO with several seeds side by side on one GPU, and the base policy's imagined rollouts beside them (runs 13, 14).
# usage: grpo_seeds_gpu.sh WORLD_MODEL_DIR BC_POLICY_DIR WORK_DIR RESULT_DIR SECONDS "SEEDS" [overrides...]
#   Each seed's run stops at runner.max_steps or after SECONDS; the overrides go to every run and to imagine.py
#   (2 draws from each start, sampling seed 7). RESULT_DIR receives grpo_seeds.tar.part* (15 MiB pieces:
#   cat grpo_seeds.tar.part* | tar -x): seedS/policy (the last checkpoint's, as float16), seedS/step (its step),
#   seedS/tensorboard, seedS.log, imagined_base.npz.
set -euo pipefail
world_model=$1 policy=$2 work=$3 result=$4 seconds=$5 seeds=$6
shift 6
here=$(dirname "$0")
source "$here/pack_seeds.sh"
mkdir -p "$work/pack" "$result"
for seed in $seeds; do
  timeout "$seconds" opensora-gym train --config "$here/grpo.yaml" env.train.checkpoint="$world_model" \
    actor.model.model_path="$policy" actor.seed="$seed" runner.log_path="$work/seed$seed" "$@" \
    > "$work/pack/seed$seed.log" 2>&1 &
done
timeout "$seconds" python "$here/imagine.py" --out "$work/pack/imagined_base.npz" --draws 2 --seed 7 -- \
  env.train.checkpoint="$world_model" runner.ckpt_path="$policy" "$@" > "$work/pack/imagine.log" 2>&1 &
wait
pack_seeds "$work" spatial_small_grpo "$seeds"
tar -cf - -C "$work/pack" . | split -b 15M -d - "$result/grpo_seeds.tar.part"
ls -la "$result"
