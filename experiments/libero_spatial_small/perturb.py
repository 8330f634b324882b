"""A control for a fine-tuned policy: the base policy moved as far as the fine-tuning moved it, in a random direction.

python experiments/libero_spatial_small/perturb.py --base BASE/policy --tuned GRPO/policy --out control/policy --seed 0

Each weight tensor of the base gets Gaussian noise scaled to the norm of that tensor's change from the base to the
tuned policy (tensors the tuning left unchanged stay unchanged), saved in the base's dtype with its config. Evaluated
in the simulator, it says how much a change of that size moves the real success rate without any learning signal.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from vla_policies.small import WEIGHTS_NAME as WEIGHTS


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--base", required=True, help="the base policy folder")
    parser.add_argument("--tuned", required=True, help="the fine-tuned policy folder (same keys)")
    parser.add_argument("--out", required=True, help="the control policy folder to write")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    base, tuned = load_file(Path(args.base) / WEIGHTS), load_file(Path(args.tuned) / WEIGHTS)
    if set(base) != set(tuned):
        raise ValueError(f"the two policies' weights differ in keys: {sorted(set(base) ^ set(tuned))}")
    generator = torch.Generator().manual_seed(args.seed)
    control, moved, total = {}, 0.0, 0.0
    for key, weight in base.items():
        change = (tuned[key].double() - weight.double()).norm()
        noise = torch.randn(weight.shape, generator=generator, dtype=torch.float64)
        direction = noise / noise.norm().clamp_min(1e-30)
        control[key] = (weight.double() + change * direction).to(weight.dtype)
        moved += float(change) ** 2
        total += float(weight.double().norm()) ** 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for path in Path(args.base).iterdir():
        if path.is_file() and path.name != WEIGHTS:
            shutil.copy2(path, out / path.name)
    save_file(control, out / WEIGHTS)
    print(f"{out}: moved {moved**0.5:.4g} in norm ({(moved / total) ** 0.5:.3%} of the base's weights)")


if __name__ == "__main__":
    main()
