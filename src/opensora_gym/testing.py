"""Helpers of the test suite only (the tiny checkpoints themselves are `opensora_gym.presets`)."""

from __future__ import annotations

import numpy as np
import torch


def random_chunk_actions(num_envs: int, seed: int = 0, action_chunk: int = 8, action_dim: int = 7) -> np.ndarray:
    """Uniform actions in [-1, 1], [num_envs, action_chunk, action_dim] float32, from a seeded generator."""
    generator = torch.Generator().manual_seed(seed)
    return (torch.rand(num_envs, action_chunk, action_dim, generator=generator) * 2 - 1).numpy()
