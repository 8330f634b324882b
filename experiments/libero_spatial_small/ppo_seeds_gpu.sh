#!/usr/bin/env bash
# PPO (RLinf's settings for OpenVLA-OFT, a new critic) from the embedded base, several seeds side by side on one GPU
# inside the embedded world model at run 22's scale (run 36's PPO rows; the critic warm-up run that follows them).
# Run on the lent machine from the repository root.
# usage: ppo_seeds_gpu.sh RESULT_DIR SECONDS STEPS "SEEDS" [overrides...]
#   Each seed's run stops at STEPS or after SECONDS (checkpoints every 5 steps); the overrides go to every run (e.g.
#   actor.optim.critic_warmup_steps=10). RESULT_DIR receives pack.tar.part* (15 MiB pieces: cat pack.tar.part* |
#   tar -x): seedS/policy (the last checkpoint's, float16), seedS/step, seedS/tensorboard, seedS.log, gpu.txt.
set -uo pipefail
result=$1 seconds=$2 steps=$3 seeds=$4
shift 4
here=$(dirname "$0")
source "$here/device_setup.sh"
export PYTHONUNBUFFERED=1
work=$(mktemp -d)
mkdir -p "$work/pack" "$result"
scale=(runner.device=cuda runner.save_interval=5 runner.max_steps="$steps" env.train.dtype=bfloat16
  env.train.total_num_envs=64 env.train.rollout_epoch=4 actor.global_batch_size=768 actor.micro_batch_size=96
  env.train.video_cfg.save_video=false runner.progress_bar=false)
ppo=(algorithm.adv_type=gae algorithm.reward_type=action_level actor.model.add_value_head=true
  actor.model.value_type=action_level algorithm.filter_rewards=false env.train.group_size=1)
for seed in $seeds; do
  timeout "$seconds" opensora-gym train --config libero_spatial_small_grpo runner.log_path="$work/seed$seed" \
    runner.experiment_name=run actor.seed="$seed" "${scale[@]}" "${ppo[@]}" "$@" > "$work/pack/seed$seed.log" 2>&1 &
done
wait
nvidia-smi --query-gpu=name --format=csv,noheader > "$work/pack/gpu.txt"
for seed in $seeds; do
  run="$work/seed$seed/run"
  [ -d "$run/checkpoints" ] || { echo "seed $seed: no checkpoint (see seed$seed.log)"; continue; }
  last=$(cd "$run" && ls -d checkpoints/global_step_* | sort -t_ -k3 -n | tail -1)
  mkdir -p "$work/pack/seed$seed"
  echo "${last##*_}" > "$work/pack/seed$seed/step"
  cp -r "$run/tensorboard" "$work/pack/seed$seed/"
  # a failed float16 copy must not lose the run: the float32 policy goes back instead
  python "$here/halve.py" "$run/$last/policy" "$work/pack/seed$seed/policy" \
    || cp -r "$run/$last/policy" "$work/pack/seed$seed/policy"
done
tar -cf - -C "$work/pack" . | split -b 15M -d - "$result/pack.tar.part"
ls -la "$result"
tail -n 3 "$work"/pack/seed*.log
