"""Discrete action tokens and action un-normalization, as OpenVLA-OFT defines them.

Actions normalized to [-1, 1] are cut into ``n_bins`` uniform bins (edges ``linspace(-1, 1, n_bins)``),
and bin ``d`` (1-based, as ``np.digitize`` counts) is written as the vocabulary id ``vocab_size - d``: the
actions overwrite the last, least used ids of the Llama-2 vocabulary. ``vocab_size`` is the tokenizer's
vocabulary *without* the padding to a multiple of 64 (32000 for Llama-2, while the embedding has 32064 rows).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

__all__ = ["ActionTokenizer", "resolve_unnorm_key", "unnormalize"]


class ActionTokenizer:
    """Maps normalized actions to vocabulary ids and back.

    Args:
        vocab_size: Size of the unpadded text vocabulary; action ids are ``[vocab_size - n_bins, vocab_size)``.
        n_bins: Number of bin edges per action dimension (256 in every released checkpoint).

    Example:
        >>> tok = ActionTokenizer(vocab_size=32000)
        >>> tok.decode(torch.tensor([31999, 31744])).tolist()  # first and last bin centre
        [-0.996078431372549, 0.996078431372549]
    """

    def __init__(self, vocab_size: int, n_bins: int = 256) -> None:
        if n_bins < 2:
            raise ValueError(f"n_bins must be at least 2, got {n_bins}")
        if vocab_size < n_bins:
            raise ValueError(f"vocab_size must be at least n_bins={n_bins}, got {vocab_size}")
        self.vocab_size = vocab_size
        self.n_bins = n_bins
        # numpy's linspace, as the reference, so decoded values match it to the last bit (torch's differs in ulps).
        self.bins = torch.from_numpy(np.linspace(-1.0, 1.0, n_bins))  # [n_bins], float64
        self.bin_centers = (self.bins[:-1] + self.bins[1:]) / 2.0  # [n_bins - 1]

    @property
    def action_token_begin(self) -> int:
        """The smallest vocabulary id that can stand for an action (``vocab_size - n_bins``)."""
        return self.vocab_size - self.n_bins

    def decode(self, token_ids: torch.Tensor | np.ndarray) -> torch.Tensor:
        """Vocabulary ids to normalized actions (the bin centres).

        Ids above the action range would give a negative bin and are clipped to the first centre; the
        last bin index (``n_bins - 1``, the edge ``+1`` itself) has no interval and maps to the last centre.

        Args:
            token_ids: Integer ids of any shape ``[...]``.

        Returns:
            Float64 tensor ``[...]`` of normalized actions in ``(-1, 1)``.
        """
        ids = torch.as_tensor(token_ids)
        if ids.dtype.is_floating_point or ids.dtype == torch.bool:
            raise TypeError(f"token_ids must be integers, got dtype {ids.dtype}")
        discretized = self.vocab_size - ids.to(torch.int64)
        index = torch.clamp(discretized - 1, min=0, max=self.n_bins - 2)
        return self.bin_centers.to(ids.device)[index]

    def encode(self, actions: torch.Tensor | np.ndarray) -> torch.Tensor:
        """Normalized actions to vocabulary ids (the reference's ``np.digitize`` rule).

        Values are clipped to ``[-1, 1]`` first. ``decode(encode(c)) == c`` for every bin centre ``c``.

        Args:
            actions: Floats of any shape ``[...]``.

        Returns:
            Int64 tensor ``[...]`` of ids in ``[vocab_size - n_bins, vocab_size)``.
        """
        values = torch.as_tensor(actions, dtype=torch.float64)
        values = torch.clamp(values, -1.0, 1.0)
        # np.digitize(x, bins) with increasing bins counts the edges <= x: searchsorted(right=True).
        discretized = torch.searchsorted(self.bins.to(values.device), values, right=True)
        return self.vocab_size - discretized


def resolve_unnorm_key(norm_stats: Mapping[str, Any], unnorm_key: str | None) -> str:
    """Pick the dataset statistics to un-normalize with, as RLinf does.

    Args:
        norm_stats: The checkpoint's ``norm_stats`` (dataset name -> {"action": {...}, ...}).
        unnorm_key: A dataset name; ``"libero_spatial"`` falls back to ``"libero_spatial_no_noops"`` when only
            the latter exists. ``None`` is allowed when the checkpoint has statistics for one dataset only.

    Returns:
        A key of ``norm_stats``.
    """
    if not norm_stats:
        raise ValueError("the checkpoint has no norm_stats, so actions cannot be un-normalized")
    if unnorm_key is None:
        if len(norm_stats) != 1:
            raise ValueError(
                f"the checkpoint has statistics for {len(norm_stats)} datasets; pass unnorm_key, one of "
                f"{sorted(norm_stats)}"
            )
        return next(iter(norm_stats))
    if unnorm_key in norm_stats:
        return unnorm_key
    if f"{unnorm_key}_no_noops" in norm_stats:
        return f"{unnorm_key}_no_noops"
    raise KeyError(
        f"unnorm_key {unnorm_key!r} is not in the checkpoint's norm_stats; choose one of {sorted(norm_stats)}"
    )


def unnormalize(actions: torch.Tensor | np.ndarray, stats: Mapping[str, Any]) -> torch.Tensor:
    """Normalized actions in [-1, 1] to robot units with the BOUNDS_Q99 rule.

    ``0.5 * (a + 1) * (q99 - q01 + 1e-8) + q01`` where ``mask`` is true, ``a`` unchanged elsewhere (the
    gripper dimension in LIBERO). ``mask`` defaults to all true, as in the reference.

    Args:
        actions: ``[..., D]`` normalized actions.
        stats: The ``"action"`` statistics of one dataset, with ``q01``, ``q99`` (length ``D``) and an
            optional ``mask``.

    Returns:
        Float64 tensor ``[..., D]`` in robot units.
    """
    values = torch.as_tensor(actions, dtype=torch.float64)
    for name in ("q01", "q99"):
        if name not in stats:
            raise KeyError(f"action statistics must have {name!r} (BOUNDS_Q99 normalization), got keys {sorted(stats)}")
    low = torch.as_tensor(stats["q01"], dtype=torch.float64, device=values.device)
    high = torch.as_tensor(stats["q99"], dtype=torch.float64, device=values.device)
    mask = torch.as_tensor(stats.get("mask", [True] * low.shape[0]), dtype=torch.bool, device=values.device)
    if not (low.shape == high.shape == mask.shape) or low.ndim != 1:
        raise ValueError(
            f"q01, q99 and mask must be vectors of one length, got {tuple(low.shape)}, {tuple(high.shape)}, "
            f"{tuple(mask.shape)}"
        )
    if values.ndim == 0 or values.shape[-1] != low.shape[0]:
        raise ValueError(
            f"actions must have last dimension {low.shape[0]} (from the statistics), got {tuple(values.shape)}"
        )
    scaled = 0.5 * (values + 1.0) * (high - low + 1e-8) + low
    return torch.where(mask, scaled, values)
