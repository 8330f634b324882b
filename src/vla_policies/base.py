"""The interface every RL policy here implements, and the observation checks they share.

An observation is the env's batched dict ``{"image": uint8 [N, H, W, 3], "task": N strings}``. A policy
emits one chunk of ``action_chunk`` actions of ``action_dim`` numbers per env, each number one discrete
token: ``act`` samples (no grad) and ``evaluate`` re-scores stored tokens (with grad) for the update.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from vla_policies.token_sampling import (
    check_sampling_args,
    entropy_from_logits,
    logprobs_of,
    process_logits,
    select_tokens,
)

__all__ = ["Policy", "PolicyEvaluation", "PolicyOutput", "check_action_tokens", "check_observation"]


@dataclass(frozen=True)
class PolicyOutput:
    """What `Policy.act` returns for N envs (T = action_chunk * action_dim tokens).

    Attributes:
        actions: ``[N, action_chunk, action_dim]`` float32, robot units (un-normalized), on the CPU.
        action_tokens: ``[N, T]`` int64 token ids; pass them back to `Policy.evaluate` unchanged.
        logprobs: ``[N, T]`` float32 log-probs of ``action_tokens`` under the processed distribution.
        values: ``[N, 1]`` (per chunk) or ``[N, action_chunk]`` (per step) float32, or None without a value head.
    """

    actions: torch.Tensor
    action_tokens: torch.Tensor
    logprobs: torch.Tensor
    values: torch.Tensor | None


@dataclass(frozen=True)
class PolicyEvaluation:
    """What `Policy.evaluate` returns; every tensor carries grad.

    Attributes:
        logprobs: ``[N, T]`` float32.
        entropy: ``[N, T]`` float32 entropy of each token's processed distribution.
        values: ``[N, 1]`` or ``[N, action_chunk]`` float32, or None without a value head.
    """

    logprobs: torch.Tensor
    entropy: torch.Tensor
    values: torch.Tensor | None


def check_observation(obs: Mapping[str, Any]) -> tuple[torch.Tensor, list[str]]:
    """Validate the env observation and return its parts.

    Args:
        obs: ``{"image": uint8 array or tensor [N, H, W, 3], "task": sequence of N strings}``.

    Returns:
        ``(images, tasks)``: the images as a uint8 tensor ``[N, H, W, 3]`` (on its original device) and the
        tasks as a list of N strings.
    """
    if not isinstance(obs, Mapping) or "image" not in obs or "task" not in obs:
        got = sorted(obs) if isinstance(obs, Mapping) else type(obs).__name__
        raise ValueError(f'observation must be a dict with keys "image" and "task", got {got}')
    image = obs["image"]
    images = torch.from_numpy(np.ascontiguousarray(image)) if isinstance(image, np.ndarray) else image
    if not isinstance(images, torch.Tensor):
        raise TypeError(f'obs["image"] must be a numpy array or torch tensor, got {type(image).__name__}')
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f'obs["image"] must have shape [N, H, W, 3], got {tuple(images.shape)}')
    if images.dtype != torch.uint8:
        raise ValueError(f'obs["image"] must be uint8 (0..255), got {images.dtype}')
    task = obs["task"]
    if isinstance(task, str) or not isinstance(task, Sequence | np.ndarray):
        raise ValueError(f'obs["task"] must be a sequence of {images.shape[0]} strings, got {type(task).__name__}')
    tasks = [str(t) for t in task]
    if len(tasks) != images.shape[0]:
        raise ValueError(f'obs["task"] has {len(tasks)} strings but obs["image"] has {images.shape[0]} images')
    if not all(isinstance(t, str | np.str_) for t in task):
        raise ValueError('obs["task"] must hold strings')
    return images, tasks


class Policy(nn.Module, ABC):
    """A chunked discrete-token policy: the contract the trainers are written against.

    Attributes:
        action_chunk: Actions per chunk (one env step executes one chunk).
        action_dim: Numbers per action.
    """

    action_chunk: int
    action_dim: int

    @property
    def num_action_tokens(self) -> int:
        """Tokens per chunk, ``action_chunk * action_dim``."""
        return self.action_chunk * self.action_dim

    @property
    @abstractmethod
    def token_range(self) -> tuple[int, int]:
        """``[begin, end)`` of the action token ids: the ids `act` returns are ``begin + bin``."""

    @abstractmethod
    def action_logits(self, obs: Mapping[str, Any]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One forward pass: float32 logits over the bins of every action token ``[N, T, n_bins]`` and the
        values (``[N, 1]`` or ``[N, action_chunk]`` float32, or None without a value head)."""

    @abstractmethod
    def tokens_to_actions(self, tokens: torch.Tensor) -> torch.Tensor:
        """Token ids ``[N, T]`` -> actions ``[N, action_chunk, action_dim]`` float32 in robot units, on the CPU."""

    @torch.no_grad()
    def act(
        self,
        obs: Mapping[str, Any],
        do_sample: bool = True,
        temperature: float = 1.6,
        top_k: int = -1,
        generator: torch.Generator | None = None,
    ) -> PolicyOutput:
        """Choose one action chunk per env, without grad.

        Sampling applies the temperature, then top-k over the action ids, and returns the log-probs of the
        sampled tokens under that distribution: what `evaluate` returns for them with the same settings. Greedy
        decoding (``do_sample=False``) returns the argmax and, as RLinf does, the log-probs of the UNSCALED
        logits: temperature and top-k play no part.

        Args:
            obs: The env observation (see `check_observation`).
            do_sample: Sample (needs ``generator``) or decode greedily (argmax).
            temperature: Logit divisor when sampling.
            top_k: When sampling, keep the k most likely tokens per position; -1 keeps all.
            generator: The only randomness source; on the policy's device.
        """
        check_sampling_args(temperature, top_k)
        logits, values = self.action_logits(obs)
        processed = process_logits(logits, temperature, top_k) if do_sample else process_logits(logits, 1.0, -1)
        bins = select_tokens(processed, do_sample, generator)  # [N, T]
        tokens = bins + self.token_range[0]  # [N, T] token ids
        return PolicyOutput(
            actions=self.tokens_to_actions(tokens),
            action_tokens=tokens,
            logprobs=logprobs_of(processed, bins),
            values=values,
        )

    def evaluate(
        self,
        obs: Mapping[str, Any],
        action_tokens: torch.Tensor,
        temperature: float = 1.6,
        top_k: int = -1,
    ) -> PolicyEvaluation:
        """Score stored tokens with grad (same processing as sampling in `act`).

        Top-k is taken over the action ids, as in RLinf's rollout (``predict_action_batch``), so the log-probs of
        unchanged weights equal the rollout's. RLinf's training forward (``default_forward``) instead takes top-k
        over the FULL vocabulary and masks to the action ids afterwards, which keeps fewer action ids whenever
        non-action tokens rank among the k largest; with ``top_k=-1`` (RLinf's training default) both agree.

        Args:
            obs: The observations the tokens were chosen for.
            action_tokens: ``[N, num_action_tokens]`` from `PolicyOutput.action_tokens`.
            temperature: Must equal the one used in `act` for the ratio to be meaningful.
            top_k: Likewise.
        """
        images, _ = check_observation(obs)
        begin, end = self.token_range
        check_action_tokens(action_tokens, images.shape[0], self.num_action_tokens, begin, end)
        logits, values = self.action_logits(obs)
        processed = process_logits(logits, temperature, top_k)  # [N, T, n_bins]
        return PolicyEvaluation(
            logprobs=logprobs_of(processed, action_tokens.to(logits.device) - begin),
            entropy=entropy_from_logits(processed),
            values=values,
        )


def check_action_tokens(action_tokens: torch.Tensor, n: int, num_tokens: int, low: int, high: int) -> None:
    """Validate stored tokens: shape ``[n, num_tokens]``, integer, every id in ``[low, high)``."""
    if not isinstance(action_tokens, torch.Tensor) or action_tokens.dtype.is_floating_point:
        got = getattr(action_tokens, "dtype", type(action_tokens).__name__)
        raise TypeError(f"action_tokens must be an integer tensor, got {got}")
    if tuple(action_tokens.shape) != (n, num_tokens):
        raise ValueError(f"action_tokens must have shape ({n}, {num_tokens}), got {tuple(action_tokens.shape)}")
    if action_tokens.numel() and (action_tokens.min() < low or action_tokens.max() >= high):
        raise ValueError(
            f"action_tokens must be ids in [{low}, {high}) (as act returns them), got min {int(action_tokens.min())}, "
            f"max {int(action_tokens.max())}"
        )
