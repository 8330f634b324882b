# Sourced by the GPU scripts that train several seeds side by side (grpo_seeds_gpu.sh, seeds_gpu.sh).
# pack_seeds WORK RUN "SEEDS": for each seed whose run WORK/seedS/RUN saved a checkpoint, writes WORK/pack/seedS/policy
# (the last checkpoint's, as float16), WORK/pack/seedS/step (its step) and WORK/pack/seedS/tensorboard.
pack_seeds() {
  local work=$1 name=$2 seeds=$3 here seed run last
  here=$(dirname "${BASH_SOURCE[0]}")
  for seed in $seeds; do
    run="$work/seed$seed/$name"
    [ -d "$run/checkpoints" ] || { echo "seed $seed: no checkpoint (see seed$seed.log)"; continue; }
    last=$(cd "$run" && ls -d checkpoints/global_step_* | sort -t_ -k3 -n | tail -1)
    mkdir -p "$work/pack/seed$seed"
    echo "${last##*_}" > "$work/pack/seed$seed/step"
    cp -r "$run/tensorboard" "$work/pack/seed$seed/"
    # a failed float16 copy must not lose the run: the float32 policy goes back instead
    python "$here/halve.py" "$run/$last/policy" "$work/pack/seed$seed/policy" \
      || cp -r "$run/$last/policy" "$work/pack/seed$seed/policy"
  done
}
