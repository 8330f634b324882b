"""The reward rule of `OpenSoraLiberoEnv`: a chunk's per-frame success probabilities -> rewards and episode end.

Semantics kept from the reference (RLinf's OpenSora env), since they define the published numbers:
- a frame's reward `r_t` is the classifier probability rounded to 0/1;
- with `use_rel_reward` the step reward of a frame is `reward_coef * r_t - reward_coef * r_(t-1)`, so a success
  counts once; the baseline `reward_coef * r_(t-1)` carries over from one chunk to the next and is 0 at the start
  of an episode. Without it the step reward is the raw `r_t` (the baseline is still tracked, unused);
- a chunk terminates the episode when one of its frames reaches `success_threshold` (its 0/1 reward, or with
  `success_from="probability"` its raw probability).
Added here: the `truncate` and `withhold` policies of the world model's uncertainty signal
(`opensora_gym.reliability`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np


@dataclass(frozen=True)
class ChunkReward:
    """What the reward rule makes of one sub-env's chunk of A frames.

    Attributes:
        rewards: [A] float32, the step reward of each frame.
        baseline: the relative reward's baseline for the next chunk: `reward_coef` times the last frame's 0/1
            reward, or the baseline before the chunk when the chunk was withheld.
        terminated: the chunk succeeded (and was not withheld): the episode ends.
        truncated: the `truncate` policy ends the episode (the signal passed the threshold).
        withheld: the `withhold` policy took the chunk's success away (its rewards are 0).
    """

    rewards: np.ndarray
    baseline: float
    terminated: bool
    truncated: bool
    withheld: bool


@dataclass(frozen=True)
class RewardRule:
    """Turns the success probabilities of a chunk's frames into step rewards and termination (module docstring).

    Attributes:
        use_rel_reward: reward the change of the frame reward, else the raw frame reward.
        reward_coef: scale of the relative reward.
        success_threshold: a frame with this reward (or probability, see `success_from`) ends the episode.
        success_from: `reward`: threshold the 0/1 rounded probability, as the reference; `probability`: threshold
            the classifier's raw probability.
        uncertainty_policy: what an uncertainty signal strictly above `uncertainty_threshold` does: `report`
            (nothing), `truncate` (the episode is truncated after the chunk) or `withhold` (a chunk that would
            succeed gets no reward, does not terminate and leaves the baseline where it was, so a later confident
            success still counts once).
        uncertainty_threshold: the threshold of `truncate` and `withhold`; finite for them.

    Example:
        >>> rule = RewardRule()
        >>> outcome = rule(np.array([0.2, 0.7, 0.8, 0.3], dtype=np.float32), baseline=0.0)
        >>> outcome.rewards.tolist(), outcome.terminated
        ([0.0, 1.0, 0.0, -1.0], True)
    """

    use_rel_reward: bool = True
    reward_coef: float = 1.0
    success_threshold: float = 0.9
    success_from: Literal["reward", "probability"] = "reward"
    uncertainty_policy: Literal["report", "truncate", "withhold"] = "report"
    uncertainty_threshold: float | None = None

    def __post_init__(self):
        if self.success_from not in ("reward", "probability"):
            raise ValueError(f"success_from must be 'reward' or 'probability', got {self.success_from!r}")
        if self.uncertainty_policy not in ("report", "truncate", "withhold"):
            raise ValueError(
                f"uncertainty_policy must be 'report', 'truncate' or 'withhold', got {self.uncertainty_policy!r}"
            )
        if self.uncertainty_policy != "report" and (
            self.uncertainty_threshold is None or not np.isfinite(self.uncertainty_threshold)
        ):
            raise ValueError(
                f"uncertainty_policy {self.uncertainty_policy!r} needs a finite uncertainty_threshold, got "
                f"{self.uncertainty_threshold!r}"
            )

    def __call__(self, probs: np.ndarray, baseline: float, uncertainty: float | None = None) -> ChunkReward:
        """Rewards and episode end of one sub-env's chunk.

        Args:
            probs: [A] float32, the classifier's success probability of each predicted frame.
            baseline: the relative reward's baseline from the previous chunk (0 at the start of an episode).
            uncertainty: the chunk's uncertainty signal; needed by the `truncate` and `withhold` policies.

        Returns:
            The chunk's `ChunkReward`.
        """
        if uncertainty is None and self.uncertainty_policy != "report":
            raise ValueError(f"uncertainty_policy {self.uncertainty_policy!r} needs the chunk's uncertainty, got None")
        frame_reward = np.round(probs).astype(np.float32)  # the reference's 0/1 reward per frame
        rewards = np.empty_like(frame_reward)
        prev = baseline
        # Frame by frame on numpy scalars: the reference's arithmetic, so the rewards match it bit for bit.
        for t, r in enumerate(frame_reward):
            rewards[t] = self.reward_coef * r - prev if self.use_rel_reward else r
            prev = self.reward_coef * r
        score = frame_reward if self.success_from == "reward" else probs
        succeeded = bool(score.max() >= self.success_threshold)
        fired = self.uncertainty_policy != "report" and bool(uncertainty > self.uncertainty_threshold)
        withheld = fired and succeeded and self.uncertainty_policy == "withhold"
        if withheld:
            rewards[:] = 0.0
            prev = baseline  # the success never happened
        return ChunkReward(
            rewards=rewards,
            baseline=prev,
            terminated=succeeded and not withheld,
            truncated=fired and self.uncertainty_policy == "truncate",
            withheld=withheld,
        )
