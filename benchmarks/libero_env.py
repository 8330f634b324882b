"""Steps per second of the real LIBERO env with 1 and N worker processes.

Each configuration makes ``gym.make_vec(<id>, num_envs=N)``, resets it (scene build + initial state + no-op
waiting, timed apart) and then steps ``--chunks`` chunks of small random actions. A policy step is one action of
one sub-env, so a chunk step of N sub-envs is 8 N policy steps. Prints one table and writes JSON.

Usage:
    python benchmarks/libero_env.py --num-envs 1 2 --chunks 5 --output libero_env.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import gymnasium as gym
import numpy as np

import opensora_gym  # noqa: F401  (registers the Libero-*-v0 ids)


def measure(env_id: str, num_envs: int, chunks: int, image_size: int, seed: int) -> dict[str, float | int]:
    """Times one reset and ``chunks`` steps of a ``num_envs`` LIBERO vector env."""
    envs = gym.make_vec(env_id, num_envs=num_envs, image_size=image_size)
    try:
        rng = np.random.default_rng(seed)
        start = time.perf_counter()
        envs.reset(seed=seed)
        reset_s = time.perf_counter() - start
        chunk = envs.unwrapped.config.action_chunk
        start = time.perf_counter()
        for _ in range(chunks):
            actions = rng.uniform(-0.3, 0.3, size=envs.action_space.shape).astype(np.float32)
            actions[..., -1] = 1.0  # keep the gripper open
            envs.step(actions)
        step_s = time.perf_counter() - start
    finally:
        envs.close()
    policy_steps = num_envs * chunks * chunk
    return {
        "num_envs": num_envs,
        "reset_s": reset_s,
        "step_s": step_s,
        "policy_steps": policy_steps,
        "steps_per_s": policy_steps / step_s,
        "steps_per_s_per_env": policy_steps / step_s / num_envs,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--env-id", default="Libero-Spatial-v0", help="a registered Libero-*-v0 id")
    parser.add_argument(
        "--num-envs", type=int, nargs="+", default=[1, os.cpu_count() or 1], help="worker counts to measure"
    )
    parser.add_argument("--chunks", type=int, default=5, help="chunk steps timed per configuration")
    parser.add_argument("--image-size", type=int, default=256, help="camera image side in pixels")
    parser.add_argument("--seed", type=int, default=0, help="seed of the env and of the random actions")
    parser.add_argument(
        "--output", type=Path, default=Path("benchmarks/results/libero_env.json"), help="JSON file to write"
    )
    args = parser.parse_args()

    results = [measure(args.env_id, num_envs, args.chunks, args.image_size, args.seed) for num_envs in args.num_envs]
    print(
        f"{args.env_id}, {args.image_size} px, {args.chunks} chunks; {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} cores, MUJOCO_GL={os.environ.get('MUJOCO_GL', 'egl (default)')}"
    )
    print(f"{'workers':>8} {'reset s':>9} {'steps/s':>9} {'steps/s/env':>12}")
    for row in results:
        per_env = row["steps_per_s_per_env"]
        print(f"{row['num_envs']:>8} {row['reset_s']:>9.2f} {row['steps_per_s']:>9.2f} {per_env:>12.2f}")
    report = {
        "env_id": args.env_id,
        "image_size": args.image_size,
        "chunks": args.chunks,
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count()},
        "results": results,
    }
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
