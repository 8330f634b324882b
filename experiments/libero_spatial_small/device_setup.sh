# Sourced on the lent GPU machine (its torch venv's python3 on PATH, no internet) before the experiment's GPU scripts:
#   source experiments/libero_spatial_small/device_setup.sh
# Puts `python` and `opensora-gym` wrappers first on PATH (a symlink to the venv's python3 would lose its packages),
# installs into /tmp/site the wheels from .whl3/ whose module the machine lacks, and sets PYTHONPATH to them, src/ and
# this folder. Fill .whl3/ on the development machine beforehand (python 3.12 wheels; keep .whl3/ out of git and pass
# it in the device call's carry):
#   python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl3 \
#     einops diffusers gymnasium farama-notifications cloudpickle imageio safetensors regex timm huggingface_hub \
#     httpx2 click typer shellingham rich peft accelerate tensorboard protobuf absl-py  # pin each to `pip freeze`s
# In session 26 the lent machine lacked only einops, diffusers, gymnasium, farama-notifications, cloudpickle, imageio
# and httpx2 (7 MB of wheels); the others are installed only where missing, so a smaller .whl3/ saves carry.
mkdir -p /tmp/bin /tmp/site
printf '#!/bin/sh\nexec python3 "$@"\n' > /tmp/bin/python
printf '#!/bin/sh\nexec python3 -m trainers.cli "$@"\n' > /tmp/bin/opensora-gym
chmod +x /tmp/bin/python /tmp/bin/opensora-gym
export PATH=/tmp/bin:$PATH PYTHONPATH=/tmp/site:$PWD/src:$PWD/experiments/libero_spatial_small
need=()
for pair in einops:einops diffusers:diffusers gymnasium:gymnasium farama_notifications:farama_notifications \
  cloudpickle:cloudpickle imageio:imageio safetensors:safetensors regex:regex timm:timm \
  huggingface_hub:huggingface_hub httpx2:httpx2 click:click typer:typer shellingham:shellingham rich:rich \
  peft:peft accelerate:accelerate tensorboard:tensorboard google.protobuf:protobuf absl:absl_py; do
  module=${pair%%:*} wheel=${pair##*:}
  python3 -c "import $module" 2>/dev/null || need+=(.whl3/"$wheel"-*.whl)
done
echo "installing ${#need[@]} wheels: ${need[*]}"
[ ${#need[@]} -eq 0 ] || python3 -m pip install -q --no-deps --no-index --target /tmp/site "${need[@]}"
python3 -c "import torch, diffusers, opensora_gym, trainers; print(torch.__version__, torch.cuda.get_device_name())"
