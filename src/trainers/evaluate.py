"""Evaluation of a policy over a fixed list of episodes: success per task and overall, with 95% Wilson intervals.

Works with any next-step autoreset vector env whose `reset(options=...)` accepts one value per sub-env for each
option key and whose step infos carry `success_once` (with its `_success_once` mask): the world-model env
(`{"episode_indices": i}`) and the LIBERO env (`{"task_id": t, "trial_id": k}`). Episodes run in waves of
`num_envs`: every wave resets all sub-envs onto its episodes and steps until each has ended once, so every listed
episode is run exactly once whatever the episode lengths.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from gymnasium.vector import VectorEnv
from tqdm.auto import tqdm

from opensora_gym.intervals import wilson_interval
from vla_policies.base import Policy

__all__ = [
    "EpisodeOutcome",
    "EvalResult",
    "evaluate_policy",
    "libero_episodes",
    "wilson_interval",
    "world_model_episodes",
]


def world_model_episodes(num_trajectories: int, num_episodes: int | None = None) -> list[dict[str, int]]:
    """Episodes of the world-model env: start trajectories 0, 1, ..., cycling when `num_episodes` is larger."""
    count = num_trajectories if num_episodes is None else num_episodes
    return [{"episode_indices": i % num_trajectories} for i in range(count)]


def libero_episodes(
    walk: Sequence[tuple[int, int]],
    num_episodes: int | None = None,
    task_ids: Sequence[int] | None = None,
    trial_ids: Sequence[int] | None = None,
) -> list[dict[str, int]]:
    """Episodes of the LIBERO env: its task x trial walk (`LiberoVectorEnv.walk`), restricted to `task_ids` and
    `trial_ids` when given, at most its first `num_episodes` (each pair is one fixed initial state: it runs once)."""
    for name, chosen, valid in (
        ("task_ids", task_ids, sorted({task for task, _ in walk})),
        ("trial_ids", trial_ids, sorted({trial for _, trial in walk})),
    ):
        unknown = sorted(set(chosen or ()) - set(valid))
        if unknown:
            raise ValueError(f"{name} must lie in {valid[0]}..{valid[-1]}, got {unknown}")
    walk = [
        (task, trial)
        for task, trial in walk
        if (task_ids is None or task in task_ids) and (trial_ids is None or trial in trial_ids)
    ]
    return [{"task_id": task, "trial_id": trial} for task, trial in walk[:num_episodes]]


@dataclass(frozen=True)
class EpisodeOutcome:
    """One evaluated episode.

    Attributes:
        episode: its reset options (one value per key).
        task: the instruction.
        success: whether it succeeded.
        length: actions taken.
    """

    episode: Mapping[str, int]
    task: str
    success: bool
    length: int


@dataclass(frozen=True)
class EvalResult:
    """The outcomes of an evaluation and their summaries."""

    outcomes: list[EpisodeOutcome] = field(default_factory=list)

    @property
    def num_episodes(self) -> int:
        return len(self.outcomes)

    @property
    def success_rate(self) -> float:
        return sum(o.success for o in self.outcomes) / max(1, len(self.outcomes))

    @property
    def interval(self) -> tuple[float, float]:
        """95% Wilson interval of the overall success rate."""
        return wilson_interval(sum(o.success for o in self.outcomes), len(self.outcomes))

    def per_task(self) -> dict[str, dict[str, float]]:
        """`{task: {"episodes", "successes", "success_rate", "ci_low", "ci_high"}}`, tasks in order of first run."""
        table: dict[str, list[bool]] = {}
        for outcome in self.outcomes:
            table.setdefault(outcome.task, []).append(outcome.success)
        summary = {}
        for task, successes in table.items():
            low, high = wilson_interval(sum(successes), len(successes))
            summary[task] = {
                "episodes": len(successes),
                "successes": sum(successes),
                "success_rate": sum(successes) / len(successes),
                "ci_low": low,
                "ci_high": high,
            }
        return summary

    def to_dict(self) -> dict:
        """Plain data for JSON: overall numbers, per task, and every episode."""
        low, high = self.interval
        return {
            "episodes": self.num_episodes,
            "success_rate": self.success_rate,
            "ci_low": low,
            "ci_high": high,
            "per_task": self.per_task(),
            "outcomes": [
                {"episode": dict(o.episode), "task": o.task, "success": o.success, "length": o.length}
                for o in self.outcomes
            ],
        }

    def table(self) -> str:
        """A text table: one line per task and the overall line."""
        width = max([len("overall"), *(len(task) for task in self.per_task())])
        lines = [f"{'task':<{width}}  episodes  success  95% CI"]
        for task, row in self.per_task().items():
            lines.append(
                f"{task:<{width}}  {row['episodes']:>8}  {row['success_rate']:>7.1%}  "
                f"[{row['ci_low']:.1%}, {row['ci_high']:.1%}]"
            )
        low, high = self.interval
        lines.append(
            f"{'overall':<{width}}  {self.num_episodes:>8}  {self.success_rate:>7.1%}  [{low:.1%}, {high:.1%}]"
        )
        return "\n".join(lines)


@torch.no_grad()
def evaluate_policy(
    env: VectorEnv,
    policy: Policy,
    episodes: Sequence[Mapping[str, int]],
    *,
    do_sample: bool = False,
    temperature: float = 1.6,
    top_k: int = -1,
    seed: int = 0,
    max_chunk_steps: int = 10_000,
    progress_bar: bool = True,
) -> EvalResult:
    """Runs every episode of `episodes` once and records its success.

    Args:
        env: a vector env as described in the module docstring.
        policy: the evaluated policy (put in eval mode).
        episodes: reset options of one episode each, e.g. `{"episode_indices": 3}` or `{"task_id": 0,
            "trial_id": 5}`; all with the same keys.
        do_sample: sample with `temperature` / `top_k` (seeded with `seed`) instead of decoding greedily.
        seed: seed of every wave's env reset (LIBERO: its scene seed, 0 in OpenVLA-OFT's protocol) and of the
            sampling.
        max_chunk_steps: a bound on the steps of one wave, against an env that never ends an episode.
        progress_bar: show a tqdm bar of finished episodes with the running success rate.

    Returns:
        the outcomes in the order of `episodes`.
    """
    if not episodes:
        raise ValueError("episodes must list at least one episode")
    keys = set(episodes[0])
    if any(set(e) != keys for e in episodes):
        raise ValueError(
            f"every episode must have the same option keys, got {sorted({tuple(sorted(e)) for e in episodes})}"
        )
    policy.eval()
    n = env.num_envs
    generator = torch.Generator(device=policy.device).manual_seed(seed)
    outcomes: list[EpisodeOutcome] = []
    bar = tqdm(total=len(episodes), desc="eval", unit="episode", disable=not progress_bar)
    for wave, start in enumerate(range(0, len(episodes), n)):
        chosen = list(episodes[start : start + n])
        # A last, partial wave fills its spare sub-envs with its first episode and ignores their outcomes.
        padded = chosen + [chosen[0]] * (n - len(chosen))
        options = {key: [e[key] for e in padded] for key in sorted(keys)}
        obs, _ = env.reset(seed=seed, options=options)
        tasks = [str(t) for t in obs["task"]]
        alive = np.ones(n, dtype=bool)
        success = np.zeros(n, dtype=bool)
        length = np.zeros(n, dtype=np.int64)
        for _ in range(max_chunk_steps):
            out = policy.act(obs, do_sample=do_sample, temperature=temperature, top_k=top_k, generator=generator)
            obs, _, terminated, truncated, info = env.step(out.actions)
            ended = alive & (np.asarray(terminated) | np.asarray(truncated))
            success[ended] = np.asarray(info["success_once"])[ended]
            length[ended] = np.asarray(info["episode_length"])[ended]
            alive &= ~ended
            if not alive.any():
                break
        else:
            raise RuntimeError(f"episodes of wave {wave} did not end within {max_chunk_steps} chunk steps")
        outcomes += [
            EpisodeOutcome(episode=dict(e), task=tasks[i], success=bool(success[i]), length=int(length[i]))
            for i, e in enumerate(chosen)
        ]
        bar.update(len(chosen))
        bar.set_postfix(success=f"{sum(o.success for o in outcomes) / len(outcomes):.3f}")
    bar.close()
    return EvalResult(outcomes)
