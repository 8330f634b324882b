"""Wrappers around the opensora-gym vector envs."""

from opensora_gym.wrappers.trajectory_recorder import TrajectoryRecorder, build_action_statistics

__all__ = ["TrajectoryRecorder", "build_action_statistics"]
