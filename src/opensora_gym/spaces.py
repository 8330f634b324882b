"""The observation and action spaces shared by the world-model env and the real LIBERO env.

One policy runs in either env: it receives the third-person image and the task text, and returns a chunk of
actions in the robot's units (LIBERO's delta end-effector controls and gripper, each in [-1, 1]).
"""

from __future__ import annotations

import string

import numpy as np
from gymnasium import spaces

# Task instructions are plain printable text (LIBERO's language goals).
TASK_CHARSET = string.printable
MAX_TASK_LENGTH = 512


def chunk_action_space(action_chunk: int = 8, action_dim: int = 7) -> spaces.Box:
    """A chunk of `action_chunk` actions, each `action_dim` controls in [-1, 1]: Box (action_chunk, action_dim)."""
    return spaces.Box(low=-1.0, high=1.0, shape=(action_chunk, action_dim), dtype=np.float32)


def observation_space(image_size: int = 256) -> spaces.Dict:
    """`image`: the third-person camera (image_size, image_size, 3) uint8; `task`: the instruction text."""
    return spaces.Dict(
        {
            "image": spaces.Box(low=0, high=255, shape=(image_size, image_size, 3), dtype=np.uint8),
            "task": spaces.Text(max_length=MAX_TASK_LENGTH, charset=TASK_CHARSET),
        }
    )
