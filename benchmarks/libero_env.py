"""Speed of the real LIBERO env: evaluation (one image per chunk) and recording (every image), 1 and N workers.

For each worker count one ``gym.make_vec(<id>, num_envs=N)`` builds its scenes with a first reset, then times a
second reset (what every later episode of a task costs: LIBERO reloads the scene, then the no-op steps settle it)
and ``--chunks`` chunk steps of small random actions per mode. Evaluation renders only the observation after each
chunk; recording (``return_frames=True``, what the video and trajectory recorders switch on) renders every step,
as the env did for evaluation too before it rendered on demand. The two modes alternate chunk by chunk on the same
env (``return_frames`` is a runtime switch), so a machine shared with other work slows both alike and their ratio
stays fair; the load average is recorded next to each row. A policy step is one action of one sub-env, so a chunk
step of N sub-envs is 8 N policy steps. Episodes per hour assume every episode runs to the suite's step limit (a
failure; successes end sooner) and count the reset. Prints one table and writes JSON.

Usage:
    python benchmarks/libero_env.py --num-envs 1 2 --chunks 8 --output benchmarks/results/libero_env.json
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

MODES = {"evaluation": False, "recording": True}  # mode -> return_frames


def measure(env_id: str, num_envs: int, chunks: int, image_size: int, seed: int) -> list[dict[str, object]]:
    """Times a reset and ``chunks`` chunk steps per mode of a ``num_envs`` LIBERO vector env; one row per mode."""
    envs = gym.make_vec(env_id, num_envs=num_envs, image_size=image_size)
    try:
        config = envs.unwrapped.config
        if 2 * chunks * config.action_chunk > config.episode_limit:
            raise ValueError(
                f"--chunks must keep both modes within one episode: 2 x chunks x {config.action_chunk} <= "
                f"{config.episode_limit}, got chunks={chunks}"
            )
        load_before = os.getloadavg()[0]
        rng = np.random.default_rng(seed)
        options = {"task_id": 0, "trial_id": list(range(num_envs))}
        envs.reset(seed=seed, options=options)
        start = time.perf_counter()
        envs.reset(seed=seed, options=options)
        reset_s = time.perf_counter() - start
        step_s = dict.fromkeys(MODES, 0.0)
        for _ in range(chunks):
            for mode, return_frames in MODES.items():
                envs.unwrapped.return_frames = return_frames
                actions = rng.uniform(-0.3, 0.3, size=envs.action_space.shape).astype(np.float32)
                actions[..., -1] = 1.0  # keep the gripper open
                start = time.perf_counter()
                envs.step(actions)
                step_s[mode] += time.perf_counter() - start
    finally:
        envs.close()
    load = [load_before, os.getloadavg()[0]]
    policy_steps = num_envs * chunks * config.action_chunk
    rows = []
    for mode, seconds in step_s.items():
        steps_per_s = policy_steps / seconds
        episode_s = reset_s + config.episode_limit * num_envs / steps_per_s  # per worker, all workers in parallel
        rows.append(
            {
                "mode": mode,
                "num_envs": num_envs,
                "return_frames": MODES[mode],
                "reset_s": reset_s,
                "step_s": seconds,
                "policy_steps": policy_steps,
                "steps_per_s": steps_per_s,
                "steps_per_s_per_env": steps_per_s / num_envs,
                "episode_steps": config.episode_limit,
                "episodes_per_hour": 3600.0 * num_envs / episode_s,
                "load_average_1min": load,
            }
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--env-id", default="Libero-Spatial-v0", help="a registered Libero-*-v0 id")
    parser.add_argument(
        "--num-envs", type=int, nargs="+", default=[1, os.cpu_count() or 1], help="worker counts to measure"
    )
    parser.add_argument("--chunks", type=int, default=8, help="chunk steps timed per mode and worker count")
    parser.add_argument("--image-size", type=int, default=256, help="camera image side in pixels")
    parser.add_argument("--seed", type=int, default=0, help="seed of the env and of the random actions")
    parser.add_argument(
        "--output", type=Path, default=Path("benchmarks/results/libero_env.json"), help="JSON file to write"
    )
    args = parser.parse_args()

    results = [row for n in args.num_envs for row in measure(args.env_id, n, args.chunks, args.image_size, args.seed)]
    print(
        f"{args.env_id}, {args.image_size} px, {args.chunks} chunks; {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} cores, MUJOCO_GL={os.environ.get('MUJOCO_GL', 'egl (default)')}"
    )
    header = ("mode", "workers", "reset s", "steps/s", "steps/s/env", "episodes/h", "load")
    print(" ".join(f"{name:>{width}}" for name, width in zip(header, (10, 8, 8, 8, 12, 11, 10), strict=True)))
    for row in results:
        load = "{:.1f}-{:.1f}".format(*row["load_average_1min"])
        print(
            f"{row['mode']:>10} {row['num_envs']:>8} {row['reset_s']:>8.2f} {row['steps_per_s']:>8.2f} "
            f"{row['steps_per_s_per_env']:>12.2f} {row['episodes_per_hour']:>11.0f} {load:>10}"
        )
    report = {
        "env_id": args.env_id,
        "image_size": args.image_size,
        "chunks": args.chunks,
        "machine": {
            "platform": platform.platform(),
            "cpu_count": os.cpu_count(),
            "mujoco_gl": os.environ.get("MUJOCO_GL", "egl (default)"),
        },
        "results": results,
    }
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
