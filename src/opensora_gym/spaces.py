"""The observation and action spaces shared by the world-model env and the real LIBERO env.

One policy runs in either env: it receives the third-person image and the task text, and returns a chunk of
actions in the robot's units as OpenVLA-OFT emits them: six end-effector deltas in [-1, 1] and the gripper with
1 = open, 0 = close. Both envs turn them into LIBERO's controller convention with `controller_actions`, the one place
the gripper convention changes (the recorded trajectories and the world model's action statistics use the
controller convention).
"""

from __future__ import annotations

import string
from typing import Any

import numpy as np
from gymnasium import spaces

# Numbers per action: 3 end-effector translation deltas, 3 rotation deltas, the gripper.
ACTION_DIM = 7
# Actions per chunk of OpenVLA-OFT and of the released world models (one env step, 8 predicted frames).
ACTION_CHUNK = 8
# LIBERO's controller takes every action number in [-1, 1]: the statistics of a dimension the data never varies.
CONTROLLER_RANGE = (-1.0, 1.0)

# Task instructions are plain printable text (LIBERO's language goals).
TASK_CHARSET = string.printable
MAX_TASK_LENGTH = 512


class TaskText(spaces.Text):
    """The task instruction: Gymnasium's `Text`, whose `shape` raises instead of returning None.

    A text space has no array shape. Stable-Baselines3 reads `shape` to size its observation buffers, where None
    fails deep inside it; raising here says instead which env gives it an observation it can batch. Gymnasium
    itself never reads a `Text`'s shape (its checkers and vector envs dispatch on the space's type).
    """

    @property
    def shape(self) -> None:
        raise TypeError(
            "the observation's 'task' is text, which has no shape, and a shape was read (Stable-Baselines3 needs one "
            "to batch observations): use the image-only id (OpenSoraLibero-Spatial-Image-v0, Libero-Spatial-Image-v0, "
            "...) or wrap the env in opensora_gym.wrappers.sb3.ImageObservation"
        )


def chunk_action_space(action_chunk: int = ACTION_CHUNK, action_dim: int = ACTION_DIM) -> spaces.Box:
    """A chunk of `action_chunk` actions, each `action_dim` controls in [-1, 1]: Box (action_chunk, action_dim)."""
    return spaces.Box(low=-1.0, high=1.0, shape=(action_chunk, action_dim), dtype=np.float32)


def observation_space(image_size: int = 256) -> spaces.Dict:
    """`image`: the third-person camera (image_size, image_size, 3) uint8; `task`: the instruction text."""
    return spaces.Dict(
        {
            "image": spaces.Box(low=0, high=255, shape=(image_size, image_size, 3), dtype=np.uint8),
            "task": TaskText(max_length=MAX_TASK_LENGTH, charset=TASK_CHARSET),
        }
    )


def controller_actions(actions: np.ndarray) -> np.ndarray:
    """Maps policy actions in robot units to LIBERO's controller: the one place the gripper convention changes.

    OpenVLA-OFT (and the data it was trained on) encodes the gripper as 1 = open, 0 = close; LIBERO's controller
    takes -1 = open, +1 = close. As in OpenVLA-OFT's evaluation the gripper is binarized at 0.5 and flipped:
    ``-sign(2 g - 1)`` (exactly 0.5 gives 0, as there). The six end-effector deltas pass through unchanged; the
    controller clips every dimension to [-1, 1].

    Args:
        actions: ``[..., 7]`` float, the policy's un-normalized actions.

    Returns:
        ``[..., 7]`` float32 controller actions (a new array).
    """
    actions = np.array(actions, dtype=np.float32)
    if actions.ndim == 0 or actions.shape[-1] != ACTION_DIM:
        raise ValueError(f"actions must have shape [..., {ACTION_DIM}], got {actions.shape}")
    actions[..., -1] = -np.sign(2.0 * actions[..., -1] - 1.0)
    return actions


def policy_actions(controller: np.ndarray) -> np.ndarray:
    """The inverse of `controller_actions` on its outputs: recorded controller actions back in robot units.

    The gripper -1 (open), +1 (close) and 0 become 1, 0 and 0.5, which `controller_actions` maps back exactly; so a
    recorded trajectory (stored in the controller convention) can be replayed through either env.

    Args:
        controller: ``[..., 7]`` float controller actions (gripper -1 = open, +1 = close).

    Returns:
        ``[..., 7]`` float32 actions in robot units (a new array).
    """
    actions = np.array(controller, dtype=np.float32)
    if actions.ndim == 0 or actions.shape[-1] != ACTION_DIM:
        raise ValueError(f"actions must have shape [..., {ACTION_DIM}], got {actions.shape}")
    actions[..., -1] = (1.0 - actions[..., -1]) / 2.0
    return actions


def reset_mask_indices(mask: Any, num_envs: int) -> list[int]:
    """The sub-envs a vector env's ``reset(options={"reset_mask": mask})`` restarts.

    Raises what Gymnasium's own vector envs raise: TypeError for a mask that is not a numpy bool array, ValueError
    for a wrong shape or a mask that restarts nothing.
    """
    if not isinstance(mask, np.ndarray):
        raise TypeError(f"reset_mask must be a numpy array of {num_envs} bools, got {type(mask).__name__}")
    if mask.shape != (num_envs,):
        raise ValueError(f"reset_mask must have shape ({num_envs},), got {mask.shape}")
    if mask.dtype != np.bool_:
        raise TypeError(f"reset_mask must have dtype bool, got {mask.dtype}")
    if not mask.any():
        raise ValueError("reset_mask must choose at least one sub-env, got all False")
    return np.flatnonzero(mask).tolist()
