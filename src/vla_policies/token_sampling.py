"""Sampling math shared by every token policy: logit processing, sampling, log-probs and entropy.

The same `process_logits` runs when sampling (`act`) and when scoring (`evaluate`), always in float32,
so the log-probs stored during a rollout equal the ones recomputed for the update.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["check_sampling_args", "entropy_from_logits", "logprobs_of", "process_logits", "select_tokens"]


def check_sampling_args(temperature: float, top_k: int) -> None:
    """Validate the decoding settings, with a message that says what is allowed."""
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < -1:
        raise ValueError(f"top_k must be -1 or 0 (off) or a positive int, got {top_k!r}")


def process_logits(logits: torch.Tensor, temperature: float, top_k: int) -> torch.Tensor:
    """Temperature, then top-k, as RLinf applies them (top-k keeps ties, like transformers' TopKLogitsWarper).

    Args:
        logits: ``[..., K]`` raw logits over the K allowed tokens.
        temperature: Divisor, > 0.
        top_k: Keep the ``top_k`` largest logits per row; ``-1`` or ``0`` keeps all (values above K keep all).

    Returns:
        Float32 ``[..., K]``; removed entries are ``-inf``.
    """
    check_sampling_args(temperature, top_k)
    scaled = logits.float() / temperature
    k = min(top_k, scaled.shape[-1])
    if k > 0:
        kth_largest = torch.topk(scaled, k, dim=-1).values[..., -1:]  # [..., 1]
        scaled = scaled.masked_fill(scaled < kth_largest, float("-inf"))
    return scaled


def select_tokens(processed_logits: torch.Tensor, do_sample: bool, generator: torch.Generator | None) -> torch.Tensor:
    """Sample from ``softmax(processed_logits)`` with ``generator``, or take the argmax.

    Args:
        processed_logits: ``[N, T, K]`` output of `process_logits`.
        do_sample: Sample when true, else greedy (argmax; temperature and top-k do not change it).
        generator: Required when sampling; must live on the logits' device. Global RNG is never used.

    Returns:
        Int64 ``[N, T]`` indices into the K allowed tokens.
    """
    if not do_sample:
        return processed_logits.argmax(dim=-1)
    if generator is None:
        raise ValueError("do_sample=True needs a torch.Generator (generator=...); the global RNG is never used")
    n, t, k = processed_logits.shape
    probs = torch.softmax(processed_logits, dim=-1).reshape(n * t, k)  # [N*T, K]
    samples = torch.multinomial(probs, num_samples=1, generator=generator)  # [N*T, 1]
    return samples.reshape(n, t)


def logprobs_of(processed_logits: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """Log-probability of ``indices`` under ``softmax(processed_logits)``.

    Args:
        processed_logits: ``[N, T, K]`` float32.
        indices: ``[N, T]`` int64 in ``[0, K)``.

    Returns:
        ``[N, T]`` float32 (``-inf`` for a token that top-k removed).
    """
    logp = F.log_softmax(processed_logits, dim=-1)
    return logp.gather(-1, indices.unsqueeze(-1)).squeeze(-1)


def entropy_from_logits(processed_logits: torch.Tensor) -> torch.Tensor:
    """Entropy of ``softmax(processed_logits)`` over the last axis; removed (-inf) entries count zero.

    Args:
        processed_logits: ``[N, T, K]`` float32.

    Returns:
        ``[N, T]`` float32.
    """
    logp = F.log_softmax(processed_logits, dim=-1)
    p = logp.exp()
    return -torch.where(p > 0, p * logp, torch.zeros_like(p)).sum(dim=-1)
