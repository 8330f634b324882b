"""Branching expert episodes: from each start, the same grasp and lift, then places that differ only in where.

Every chosen (task, trial) start is played ``--branches`` times by the scripted expert with the same noise (its
generator is seeded by the start, not the episode), so all its episodes share the frames and actions up to the end
of the lift. Branch 0 then carries the bowl to the plate as the expert does; branch b > 0 carries it to a point
shifted sideways by a distance drawn from ``--shift`` (metres, in a drawn direction) and releases it there. Some
shifted releases still land on the plate, the others do not: the world model sees success and failure from the
same frames, decided by the actions alone, and LIBERO's own check labels each frame.

Episode ``e`` plays start ``e % P`` (the P starts task-major, as `opensora-gym collect`) as branch ``e // P``; the
folder is resumable like collect's.

python experiments/libero_spatial_small/branch.py --output data/branch --task-ids 0 1 --trial-ids $(seq 0 14) \
    --branches 4 --num-envs 2
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any

import numpy as np

from opensora_gym.collect import CollectConfig, collect_episodes
from opensora_gym.expert import ScriptedSpatialExpert, SpatialExpert, SpatialExpertConfig
from opensora_gym.intervals import wilson_interval


class BranchingExpert(ScriptedSpatialExpert):
    """The scripted expert whose episode ``e`` is branch ``e // starts`` of start ``e % starts``.

    Args:
        config: the expert's settings (its mistake knobs are not used: the branch sets the place).
        num_envs: sub-envs of the env.
        starts: the number of chosen starts P.
        shift: (min, max) sideways shift of the place of branches b > 0, metres.
    """

    def __init__(self, config: SpatialExpertConfig, num_envs: int, starts: int, shift: tuple[float, float]) -> None:
        super().__init__(config, num_envs)
        self.starts = starts
        self.shift = shift

    def begin(self, index: int, seed: Any) -> None:
        base, episode = seed
        start, branch = episode % self.starts, episode // self.starts
        expert = SpatialExpert(self.config, np.random.default_rng((base, start)))
        if branch > 0:
            draw = np.random.default_rng((base, start, branch))
            angle = draw.uniform(0.0, 2.0 * math.pi)
            distance = draw.uniform(*self.shift)
            expert.place_shift = np.array([math.cos(angle), math.sin(angle), 0.0]) * distance
        self.experts[index] = expert


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", type=Path, required=True, help="output folder (dataset/, statistics)")
    parser.add_argument("--task-ids", type=int, nargs="+", required=True, help="LIBERO-Spatial tasks")
    parser.add_argument("--trial-ids", type=int, nargs="+", required=True, help="initial states of each task")
    parser.add_argument("--branches", type=int, default=4, help="episodes per start: 1 expert place + shifted ones")
    parser.add_argument("--shift", type=float, nargs=2, default=(0.02, 0.10), help="min max shift of branches > 0")
    parser.add_argument("--action-noise-std", type=float, default=0.1, help="noise on the arm commands")
    parser.add_argument("--lift-ramp-steps", type=int, default=8, help="first lift steps that rise slowly")
    parser.add_argument("--post-success-steps", type=int, default=24, help="steps recorded after LIBERO's success")
    parser.add_argument("--max-episode-steps", type=int, default=200, help="steps per episode")
    parser.add_argument("--image-size", type=int, default=128, help="side of the recorded images")
    parser.add_argument("--num-envs", type=int, default=2, help="LIBERO worker processes")
    parser.add_argument("--seed", type=int, default=0, help="seed of the noise and the shifts")
    args = parser.parse_args()
    if args.branches < 1:
        parser.error(f"--branches must be >= 1, got {args.branches}")
    if not 0 < args.shift[0] <= args.shift[1]:
        parser.error(f"--shift must be min max with 0 < min <= max, got {args.shift}")
    starts = len(args.task_ids) * len(args.trial_ids)
    config = CollectConfig(
        output=args.output,
        task_ids=tuple(args.task_ids),
        trial_ids=tuple(args.trial_ids),
        num_episodes=starts * args.branches,
        image_size=args.image_size,
        num_envs=args.num_envs,
        max_episode_steps=args.max_episode_steps,
        post_success_steps=args.post_success_steps,
        privileged_state=True,
        seed=args.seed,
    )
    expert_config = SpatialExpertConfig(action_noise_std=args.action_noise_std, lift_ramp_steps=args.lift_ramp_steps)
    episodes = collect_episodes(config, BranchingExpert(expert_config, args.num_envs, starts, tuple(args.shift)))
    for branch in range(args.branches):
        outcomes = [episode.success for index, episode in enumerate(episodes) if index // starts == branch]
        low, high = wilson_interval(sum(outcomes), len(outcomes))
        print(f"branch {branch}: {sum(outcomes)}/{len(outcomes)} succeed (95% Wilson {low:.1%}-{high:.1%})")


if __name__ == "__main__":
    main()
