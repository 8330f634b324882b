"""Wrappers around the opensora-gym vector envs."""

from opensora_gym.wrappers.libero_training import LiberoTrainingEnv
from opensora_gym.wrappers.trajectory_recorder import TrajectoryRecorder, build_action_statistics

__all__ = ["LiberoTrainingEnv", "TrajectoryRecorder", "build_action_statistics"]
