"""How far to trust a world-model chunk: the per-chunk uncertainty signals and the statistics that validate them.

Two signals, one number per sub-env and chunk, larger meaning less trustworthy:

- `draw_disagreement`: the chunk is sampled K times from different starting noise (same condition frames, same
  actions); the signal is the mean over channels, frames and latent pixels of the per-element standard deviation
  (population, over the K draws) of the predicted latents. Identical draws give exactly 0.
- `classifier_uncertainty`: how close the reward classifier came to its 0.5 rounding threshold anywhere in the
  chunk, `1 - 2 * min_t |p_t - 0.5|` in [0, 1]: 0 when every frame is classified with probability 0 or 1, 1 when
  some frame sits exactly on the threshold.

`auroc` (with `auroc_interval`) and `spearman` measure how well a signal predicts what went wrong (a false
success, a large frame error); `benchmarks/reliability_validation.py` computes them against recorded episodes.
"""

from __future__ import annotations

import numpy as np
import torch
from einops import reduce

from opensora_gym.intervals import Z_95


def draw_disagreement(draws: torch.Tensor) -> torch.Tensor:
    """Mean per-element standard deviation of K predicted latents of the same chunk.

    The deviations are taken from draw 0 before the standard deviation (which does not change it), so K draws
    that are equal give exactly 0, not a float-rounding residue of the mean.

    Args:
        draws: [N, K, C, A, h, w] latents, K >= 2 draws per sub-env.

    Returns:
        [N] float32.
    """
    if draws.ndim != 6 or draws.shape[1] < 2:
        raise ValueError(f"draws must have shape [N, K >= 2, C, A, h, w], got {tuple(draws.shape)}")
    deviations = draws.float() - draws[:, :1].float()  # [N, K, C, A, h, w]
    return reduce(deviations.std(dim=1, correction=0), "n c a h w -> n", "mean")


def classifier_uncertainty(success_prob: np.ndarray) -> np.ndarray:
    """`1 - 2 * min_t |p_t - 0.5|` over the frames of each chunk.

    Args:
        success_prob: [N, A] classifier probabilities.

    Returns:
        [N] float32 in [0, 1].
    """
    success_prob = np.asarray(success_prob, dtype=np.float32)
    if success_prob.ndim != 2:
        raise ValueError(f"success_prob must have shape [N, A], got {success_prob.shape}")
    return 1.0 - 2.0 * np.abs(success_prob - 0.5).min(axis=1)


def average_ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks of `values` [M], ties sharing the mean of their ranks.

    Returns:
        [M] float64.
    """
    values = np.asarray(values, dtype=np.float64)
    if values.ndim != 1:
        raise ValueError(f"values must be one-dimensional, got shape {values.shape}")
    order = np.argsort(values, kind="stable")
    sorted_values = values[order]
    ranks = np.empty(len(values))
    # Runs of equal values: [starts[j], ends[j]) in sorted order.
    starts = np.flatnonzero(np.r_[True, sorted_values[1:] != sorted_values[:-1]])
    ends = np.r_[starts[1:], len(values)]
    for start, end in zip(starts, ends, strict=True):
        ranks[order[start:end]] = (start + 1 + end) / 2  # mean of the ranks start + 1 .. end
    return ranks


def auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve of `scores` [M] for binary `labels` [M], by the Mann-Whitney U statistic.

    AUROC = (sum of the positives' ranks - P (P + 1) / 2) / (P Q) with P positives and Q negatives, ties counted
    one half: the probability that a random positive scores above a random negative.

    Raises:
        ValueError: the shapes differ or one class is missing (the area is undefined).
    """
    scores, labels = np.asarray(scores, dtype=np.float64), np.asarray(labels, dtype=bool)
    if scores.shape != labels.shape or scores.ndim != 1:
        raise ValueError(f"scores and labels must be [M] each, got {scores.shape} and {labels.shape}")
    positives, negatives = int(labels.sum()), int((~labels).sum())
    if positives == 0 or negatives == 0:
        raise ValueError(f"AUROC needs both classes, got {positives} positives and {negatives} negatives")
    rank_sum = average_ranks(scores)[labels].sum()
    return float((rank_sum - positives * (positives + 1) / 2) / (positives * negatives))


def auroc_interval(area: float, positives: int, negatives: int, z: float = Z_95) -> tuple[float, float]:
    """Normal-approximation interval (95% by default) of an AUROC `area` from `positives` and `negatives` samples,
    with Hanley and McNeil's (1982) standard error, clipped to [0, 1].

    SE^2 = (A (1 - A) + (P - 1)(Q1 - A^2) + (N - 1)(Q2 - A^2)) / (P N), Q1 = A / (2 - A), Q2 = 2 A^2 / (1 + A).
    """
    if positives < 1 or negatives < 1 or not 0 <= area <= 1:
        raise ValueError(f"expected an area in [0, 1] and both classes, got {area}, {positives} and {negatives}")
    q1, q2 = area / (2 - area), 2 * area**2 / (1 + area)
    variance = area * (1 - area) + (positives - 1) * (q1 - area**2) + (negatives - 1) * (q2 - area**2)
    half = z * np.sqrt(max(variance, 0.0) / (positives * negatives))
    return float(max(area - half, 0.0)), float(min(area + half, 1.0))


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman rank correlation of `x` [M] and `y` [M]: the Pearson correlation of their average ranks.

    Raises:
        ValueError: the shapes differ, fewer than 2 values, or one side is constant (the correlation is undefined).
    """
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if x.shape != y.shape or x.ndim != 1 or len(x) < 2:
        raise ValueError(f"x and y must be [M] each with M >= 2, got {x.shape} and {y.shape}")
    rx, ry = average_ranks(x), average_ranks(y)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    denominator = np.sqrt((rx**2).sum() * (ry**2).sum())
    if denominator == 0:
        raise ValueError("Spearman correlation needs non-constant x and y, got a constant side")
    return float((rx * ry).sum() / denominator)
