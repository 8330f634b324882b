"""Metric logging to the backends of `runner.logger_backends`: TensorBoard, and wandb / swanlab when chosen.

wandb and swanlab are imported only when they are chosen, so neither is a dependency.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = ["MetricLogger"]


class MetricLogger:
    """Writes scalar metrics `{name: value}` at a step to every chosen backend.

    Args:
        backends: any of `tensorboard`, `wandb`, `swanlab`.
        log_dir: the run folder; TensorBoard event files go to `<log_dir>/tensorboard`.
        experiment_name: the run's name in wandb / swanlab.
        config: the run's configuration, stored by wandb / swanlab.
    """

    def __init__(
        self,
        backends: Sequence[str],
        log_dir: str | Path,
        experiment_name: str,
        config: Mapping[str, Any] | None = None,
    ):
        self.backends = tuple(backends)
        self.log_dir = Path(log_dir)
        self._writer = None
        self._wandb = None
        self._swanlab = None
        if "tensorboard" in self.backends:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(log_dir=str(self.log_dir / "tensorboard"))
        if "wandb" in self.backends:
            import wandb

            self._wandb = wandb.init(
                project="opensora-gym", name=experiment_name, dir=str(self.log_dir), config=dict(config or {})
            )
        if "swanlab" in self.backends:
            import swanlab

            self._swanlab = swanlab.init(
                project="opensora-gym",
                experiment_name=experiment_name,
                logdir=str(self.log_dir),
                config=dict(config or {}),
            )

    @property
    def tensorboard_dir(self) -> Path:
        """Where the TensorBoard event files are."""
        return self.log_dir / "tensorboard"

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        """Writes the finite scalars; an undefined one (NaN, e.g. the explained variance of constant returns, or a
        mean over an empty selection) is left out, so a curve has no NaN points."""
        values = {key: float(value) for key, value in metrics.items() if math.isfinite(float(value))}
        if self._writer is not None:
            for key, value in values.items():
                self._writer.add_scalar(key, value, global_step=step)
            self._writer.flush()
        if self._wandb is not None:
            self._wandb.log(values, step=step)
        if self._swanlab is not None:
            self._swanlab.log(values, step=step)

    def close(self) -> None:
        """Flushes and closes every backend."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None
        if self._swanlab is not None:
            self._swanlab.finish()
            self._swanlab = None
