#!/usr/bin/env bash
# Run 12's world model and imagined-frame classifier, rebuilt on one GPU (runs 13 and 14's WMDI), in a few minutes.
# usage: imagined_reward_gpu.sh WM0 TRAIN BRANCHES WORK_DIR RESULT_DIR
#   WM0: the world-model folder to fine-tune (embedded: src/opensora_gym/assets/libero_spatial_small);
#   TRAIN: the fine-tuning dataset folder (traj*.npy); BRANCHES: branch.py's 64 px dataset of trials 0-9.
#   1. WM0 fine-tuned with action dropout 0.2 (run 12's wmd: 2000 steps x 16 clips);
#   2. its imagined rollouts of the branches at guidance 3, 2 draws, labelled with the simulator's flags;
#   3. a classifier trained on them (run 12's rmi);
#   4. WMDI: wmd's world model as float16 with rmi as its reward model (and WM0's vae/ and dataset/).
#   RESULT_DIR receives wmdi.tar.part* (15 MiB pieces: cat wmdi.tar.part* | tar -x): WMDI without the vae/ and
#   dataset/ it shares with WM0 (copy them into its wmdi/ after unpacking), rmi's report, the fine-tune's
#   TensorBoard log and times.json.
#   (a quick CPU check: DEVICE=cpu WM_STEPS=2 RM_STEPS=2 STARTS=0:0-1 imagined_reward_gpu.sh ...)
#   INIT=FOLDER fine-tunes that world model instead of WM0 (WM0 still gives the statistics and the first classifier);
#   FROM_START=1 imagines BRANCHES from each episode's first frame (a policy's recorded rollouts, run 16).
set -euo pipefail
wm0=$1 train=$2 branches=$3 work=$4 result=$5
device=${DEVICE:-cuda} wm_steps=${WM_STEPS:-2000} rm_steps=${RM_STEPS:-2000} starts=${STARTS:-0:0-9 1:0-9}
init=${INIT:-$wm0} from_start=()
[ "${FROM_START:-0}" = 1 ] && from_start=(--from-start)
here=$(dirname "$0")
mkdir -p "$work" "$result"
t0=$(date +%s)
opensora-gym train-world-model --init-checkpoint "$init" --dataset "$train" --statistics "$wm0/dataset_statistics.json" \
  --reward-model "$wm0/resnet_rm.pth" --out "$work/wmd" --image-size 64 --device "$device" --batch-size 16 --lr 2e-4 \
  --warmup-steps 100 --ema-decay 0.998 --max-steps "$wm_steps" --checkpoint-every 250 --action-dropout 0.2 \
  --log-every 250
t1=$(date +%s)
python "$here/imagined_frames.py" write --dataset "$branches" --starts $starts \
  --world-model "$work/wmd/world_model" --action-guidance 3 --draws 2 --device "$device" "${from_start[@]}" \
  --out "$work/imagined_train"
t2=$(date +%s)
opensora-gym train-reward-model --dataset "$work/imagined_train" --out "$work/rmi" --image-size 64 \
  --widths 16 32 64 128 --max-steps "$rm_steps" --batch-size 128 --success-window 2 --device "$device" --log-every 500
t3=$(date +%s)
python "$here/halve.py" "$work/wmd/world_model" "$work/pack/wmdi"
cp "$work/rmi/resnet_rm.pth" "$work/pack/wmdi/"
echo "{\"world_model_s\": $((t1 - t0)), \"imagined_s\": $((t2 - t1)), \"classifier_s\": $((t3 - t2)), \"wm_steps\": $wm_steps}" \
  > "$work/pack/times.json"
cp -r "$work/wmd/tensorboard" "$work/pack/wmd_tensorboard"
find "$work/rmi" -maxdepth 1 -name '*.json' -exec cp {} "$work/pack/" \;
tar -cf - -C "$work/pack" . | split -b 15M -d - "$result/wmdi.tar.part"
ls -la "$result"
