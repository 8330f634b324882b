"""The policy sampled in the world model from every start of its dataset, the actions of each episode recorded.

python experiments/libero_spatial_small/imagine.py --out imagined.npz --draws 2 -- \
    runner.device=cuda env.train.checkpoint=wm8 runner.ckpt_path=bc3/policy

The world model and the policy are those of the experiment's config (`grpo.yaml`) with the overrides after `--`;
episodes run as GRPO's rollouts do (`env.train`, sampling at `rollout.temperature_train`). Writes an npz with one row
per episode: `task`, `trial` (parsed from the start file's name), `success` (imagined), `length` (actions) and
`actions` [E, max_episode_steps, 7] (zeros past the length), and two graded scores of the outcome from the reward
classifier's success probability of the imagined frames: `peak_probability` (its highest over the episode) and
`final_probability` (that of the episode's last frame, the last of its last chunk). `replay.py` executes the actions
in the simulator.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from from_recorded import task_and_trial  # the script's folder

from trainers.build import build_world_model_env, starting_policy
from trainers.config import load_config

CONFIG = Path(__file__).parent / "grpo.yaml"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="the npz to write")
    parser.add_argument("--draws", type=int, default=1, help="episodes from each start")
    parser.add_argument("--max-starts", type=int, default=None, help="only the first starts of the dataset")
    parser.add_argument("--num-envs", type=int, default=64, help="sub-envs of the world-model env")
    parser.add_argument("--seed", type=int, default=0, help="seeds the policy's sampling (a wave's reset: its start)")
    parser.add_argument("overrides", nargs="*", help="config overrides (after --)")
    args = parser.parse_args(argv)
    config = load_config(CONFIG, args.overrides)
    env = build_world_model_env(config, args.num_envs, group_size=1)
    policy = starting_policy(config, env.world_model.statistics)
    policy.eval()
    starts = [task_and_trial(path) for path in env.dataset.paths[: args.max_starts]]
    plan = [index for _ in range(args.draws) for index in range(len(starts))]
    limit, n = env.config.max_episode_steps, args.num_envs
    generator = torch.Generator(device=policy.device).manual_seed(args.seed)
    task, trial, success, length, actions, peak, final = [], [], [], [], [], [], []
    for begin in range(0, len(plan), n):
        wave = plan[begin : begin + n]
        observation, _ = env.reset(seed=begin, options={"episode_indices": wave + [wave[0]] * (n - len(wave))})
        alive, taken = np.ones(n, dtype=bool), []  # [N, chunk, 7] per chunk
        ended_success, ended_length = np.zeros(n, dtype=bool), np.zeros(n, dtype=np.int64)
        peak_probability, final_probability = np.zeros(n, dtype=np.float32), np.zeros(n, dtype=np.float32)
        while alive.any():
            with torch.no_grad():
                chosen = policy.act(
                    observation,
                    do_sample=True,
                    temperature=config.rollout.temperature_train,
                    top_k=config.rollout.top_k,
                    generator=generator,
                ).actions
            taken.append(chosen.float().cpu().numpy())
            observation, _, terminated, truncated, info = env.step(taken[-1])
            peak_probability[alive] = np.maximum(peak_probability[alive], info["success_prob"][alive].max(axis=1))
            ended = alive & (terminated | truncated)
            ended_success[ended], ended_length[ended] = terminated[ended], info["episode_length"][ended]
            final_probability[ended] = info["success_prob"][ended, -1]
            alive &= ~ended
        steps = np.concatenate(taken, axis=1)  # [N, T, 7]
        for k, index in enumerate(wave):
            task.append(starts[index][0])
            trial.append(starts[index][1])
            success.append(bool(ended_success[k]))
            length.append(int(ended_length[k]))
            peak.append(float(peak_probability[k]))
            final.append(float(final_probability[k]))
            padded = np.zeros((limit, steps.shape[2]), dtype=np.float32)
            padded[: length[-1]] = steps[k, : length[-1]]
            actions.append(padded)
        print(f"wave {begin // n}: imagined success {ended_success[: len(wave)].mean():.3f}", file=sys.stderr)
    np.savez_compressed(
        args.out,
        task=task,
        trial=trial,
        success=success,
        length=length,
        actions=np.stack(actions),
        peak_probability=np.array(peak, dtype=np.float32),
        final_probability=np.array(final, dtype=np.float32),
    )
    print(f"imagined success {np.mean(success):.4f} over {len(success)} episodes; wrote {args.out}")


if __name__ == "__main__":
    main()
