"""`opensora-gym collect`: record LIBERO episodes of the scripted expert or of a saved policy into a dataset folder.

opensora-gym collect --expert --output data/spatial_expert --task-ids 0 1 2 3 --trial-ids 0 1 2 --image-size 128
opensora-gym collect --expert --mistake-probability 0.3 --action-noise-std 0.1 --output data/spatial_mixed
opensora-gym collect --policy runs/x/checkpoints/global_step_20 --output data/policy --num-episodes 50
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from opensora_gym.checkpoint import DATASET_FOLDER, STATISTICS_NAME
from opensora_gym.collect import CollectConfig, CollectedEpisode, collect_episodes
from opensora_gym.expert import MISTAKE_KINDS, ScriptedSpatialExpert, SpatialExpertConfig
from opensora_gym.intervals import wilson_interval
from trainers.build import load_policy

__all__ = ["PolicyActor", "add_collect_arguments", "run_collect", "summary"]


class PolicyActor:
    """A saved policy as a collection actor (:class:`opensora_gym.collect.Actor`).

    Args:
        policy: a `vla_policies.Policy`.
        do_sample: sample the action tokens (with `temperature`) instead of decoding greedily.
        temperature: logit divisor when sampling.
        seed: seed of the one sampling generator (the policy's draws are not tied to an episode).
    """

    def __init__(self, policy: Any, do_sample: bool, temperature: float, seed: int) -> None:
        self.policy = policy.eval()
        self.action_chunk = policy.action_chunk
        self.do_sample = do_sample
        self.temperature = temperature
        self.generator = torch.Generator(device=policy.device).manual_seed(seed)

    def begin(self, index: int, seed: Any) -> None:
        """Nothing to reset: the policy is stateless between chunks."""

    def act(self, observation: dict[str, Any], info: dict[str, Any]) -> np.ndarray:
        """Actions ``[N, action_chunk, 7]`` float32 in robot units (gripper 1 = open, 0 = close)."""
        output = self.policy.act(
            observation, do_sample=self.do_sample, temperature=self.temperature, generator=self.generator
        )
        return output.actions.numpy()


def summary(episodes: list[CollectedEpisode], seconds: float) -> dict[str, Any]:
    """Episodes, successes, the success rate with its 95% Wilson interval, and the rate of new episodes per hour."""
    successes = sum(episode.success for episode in episodes)
    low, high = wilson_interval(successes, len(episodes))
    new = sum(episode.new for episode in episodes)
    return {
        "episodes": len(episodes),
        "new_episodes": new,
        "successes": successes,
        "success_rate": successes / len(episodes),
        "ci_low": low,
        "ci_high": high,
        "frames": sum(episode.length + 1 for episode in episodes),
        "seconds": seconds,
        "new_episodes_per_hour": 3600.0 * new / seconds if new else None,
    }


def add_collect_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The options of `opensora-gym collect`, added to `parser`."""
    actor = parser.add_mutually_exclusive_group(required=True)
    actor.add_argument("--expert", action="store_true", help="the scripted LIBERO-Spatial expert (privileged state)")
    actor.add_argument("--policy", help="a save_pretrained policy folder, or a trainer checkpoint with policy/")
    parser.add_argument("--output", required=True, help=f"output folder: {DATASET_FOLDER}/traj*.npy, {STATISTICS_NAME}")
    parser.add_argument("--suite", default="libero_spatial", help="LIBERO suite (the expert: libero_spatial only)")
    parser.add_argument("--task-ids", type=int, nargs="+", help="tasks to play (default: all)")
    parser.add_argument("--trial-ids", type=int, nargs="+", help="initial states of each task (default: all)")
    parser.add_argument("--num-episodes", type=int, help="episodes (default: one per task x trial; more cycle)")
    parser.add_argument("--image-size", type=int, default=128, help="side of the recorded images")
    parser.add_argument("--num-envs", type=int, default=1, help="LIBERO worker processes")
    parser.add_argument("--max-episode-steps", type=int, help="steps per episode (default: the suite's limit)")
    parser.add_argument(
        "--post-success-steps", type=int, default=0, help="steps recorded after LIBERO's first success (0: the "
        "episode ends there); frames keep the simulator's per-frame success flag",
    )  # fmt: skip
    parser.add_argument("--seed", type=int, default=0, help="seed of the expert's noise and mistakes / of sampling")
    parser.add_argument("--action-noise-std", type=float, default=0.0, help="expert: Gaussian noise on arm commands")
    parser.add_argument(
        "--mistake-probability", type=float, default=0.0, help="expert: per-episode chance of one mistake",
    )  # fmt: skip
    parser.add_argument(
        "--mistake-kinds", nargs="+", choices=MISTAKE_KINDS, default=list(SpatialExpertConfig.mistake_kinds),
        help="expert: the kinds a mistake is drawn from (hover: holds the bowl above the plate, never releases)",
    )  # fmt: skip
    parser.add_argument(
        "--lift-ramp-steps", type=int, default=0, help="expert: first lift steps that rise slowly (0: none)"
    )
    parser.add_argument("--do-sample", action="store_true", help="policy: sample instead of greedy decoding")
    parser.add_argument("--temperature", type=float, default=1.0, help="policy: sampling temperature")
    parser.add_argument("--device", default="cpu", help="policy: torch device")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def run_collect(args: argparse.Namespace) -> dict[str, Any]:
    """Runs `opensora-gym collect`: plays the missing episodes, prints and returns the summary."""
    config = CollectConfig(
        output=Path(args.output),
        suite=args.suite,
        task_ids=args.task_ids,
        trial_ids=args.trial_ids,
        num_episodes=args.num_episodes,
        image_size=args.image_size,
        num_envs=args.num_envs,
        max_episode_steps=args.max_episode_steps,
        post_success_steps=args.post_success_steps,
        privileged_state=args.expert,
        seed=args.seed,
        progress=not args.no_progress,
    )
    if args.expert:
        if args.suite != "libero_spatial":
            raise ValueError(f"the scripted expert plays libero_spatial only, got --suite {args.suite}")
        expert_config = SpatialExpertConfig(
            action_noise_std=args.action_noise_std,
            mistake_probability=args.mistake_probability,
            mistake_kinds=args.mistake_kinds,
            lift_ramp_steps=args.lift_ramp_steps,
        )
        actor = ScriptedSpatialExpert(expert_config, num_envs=args.num_envs)
    else:
        policy = load_policy(args.policy, args.device)
        actor = PolicyActor(policy, args.do_sample, args.temperature, args.seed)
    start = time.perf_counter()
    result = summary(collect_episodes(config, actor), time.perf_counter() - start)
    rate = result["new_episodes_per_hour"]
    print(
        f"{result['episodes']} episodes ({result['new_episodes']} new), {result['successes']} successes: success "
        f"rate {result['success_rate']:.1%} [95% CI {result['ci_low']:.1%}, {result['ci_high']:.1%}]; "
        f"{result['seconds']:.0f} s" + (f", {rate:.0f} new episodes/hour" if rate else "")
    )
    print(f"dataset: {config.output / DATASET_FOLDER}; statistics: {config.output / STATISTICS_NAME}")
    return result
