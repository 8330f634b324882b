"""Tiny random-weight checkpoints in the exact released layout, for tests and the embedded default job."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from opensora_gym.checkpoint import DATASET_FOLDER, STATISTICS_NAME, VAE_FOLDER
from opensora_gym.data import ActionStatistics, save_trajectory
from opensora_gym.models.reward import ResNetRewardModel
from opensora_gym.models.stdit3 import STDiT3, STDiT3Config
from opensora_gym.models.vae import VideoVAE

TINY_TASKS = (
    "pick up the black bowl between the plate and the ramekin and place it on the plate",
    "pick up the black bowl next to the cookie box and place it on the plate",
    "pick up the black bowl on the wooden cabinet and place it on the plate",
)


def tiny_vae_config(latent_channels: int = 4) -> dict:
    """A real diffusers AutoencoderKL config with SDXL's 8x downsampling and very few channels."""
    return {
        "in_channels": 3,
        "out_channels": 3,
        "down_block_types": ["DownEncoderBlock2D"] * 4,
        "up_block_types": ["UpDecoderBlock2D"] * 4,
        "block_out_channels": [8, 8, 8, 8],
        "layers_per_block": 1,
        "norm_num_groups": 4,
        "latent_channels": latent_channels,
        "sample_size": 64,
    }


@dataclass(frozen=True)
class TinyCheckpointSpec:
    """Sizes of a tiny checkpoint.

    Attributes:
        image_size: side of the square trajectory frames.
        num_trajectories: files in `dataset/`.
        trajectory_length: frames per trajectory.
        dit: the STDiT3 architecture.
        reward_widths: the reward classifier's stage widths.
        max_shard_bytes: shard size of the DiT weights (small, so the index names several shards).
    """

    image_size: int = 64
    num_trajectories: int = 6
    trajectory_length: int = 12
    dit: STDiT3Config = field(default_factory=lambda: STDiT3Config(depth=2, hidden_size=32, num_heads=4))
    reward_widths: tuple[int, int, int, int] = (4, 8, 8, 16)
    max_shard_bytes: int = 200_000


def _scene(rng: np.random.Generator, size: int, steps: int, actions: np.ndarray) -> np.ndarray:
    """Frames [steps, size, size, 3] uint8 of a square that moves with the cumulative actions over a gradient."""
    ramp = np.linspace(40.0, 200.0, size)
    background = np.stack(np.broadcast_arrays(ramp[:, None], ramp[None], 90.0), axis=-1)  # [size, size, 3]
    colour = rng.integers(0, 256, size=3)
    position = rng.uniform(0.3, 0.7, size=2) * size
    side = max(size // 8, 2)
    frames = np.empty((steps, size, size, 3), dtype=np.uint8)
    for t in range(steps):
        position = np.clip(position + actions[t, :2] * size / 8, 0, size - side)
        frame = background.copy()
        y, x = position.astype(int)
        frame[y : y + side, x : x + side] = colour
        frames[t] = frame.astype(np.uint8)
    return frames


def make_tiny_checkpoint(folder: str | Path, spec: TinyCheckpointSpec | None = None, seed: int = 0) -> Path:
    """Writes a complete world-model checkpoint with tiny random weights in the released layout.

    The folder gets `config.json`, sharded `model-0000k.safetensors` with `model.safetensors.index.json`,
    `vae/`, `resnet_rm.pth`, `dataset/traj*.npy` and `dataset_statistics.json`. Weights come from `seed`;
    the global RNG state is left as it was.

    Returns:
        the folder.
    """
    spec = spec or TinyCheckpointSpec()
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        STDiT3(spec.dit).save_pretrained(folder, max_shard_bytes=spec.max_shard_bytes)
        VideoVAE.from_config(tiny_vae_config(spec.dit.in_channels)).save_pretrained(folder / VAE_FOLDER)
        reward = ResNetRewardModel(spec.reward_widths)
        # Fresh BatchNorm statistics (mean 0, variance 1) would make every frame look alike to the classifier.
        for name, buffer in reward.named_buffers():
            if name.endswith("running_mean"):
                buffer.normal_(0.0, 0.1)
            elif name.endswith("running_var"):
                buffer.uniform_(0.5, 1.5)
        reward.save_pretrained(folder)

    rng = np.random.default_rng(seed)
    dataset = folder / DATASET_FOLDER
    dataset.mkdir(exist_ok=True)
    all_actions = []
    for i in range(spec.num_trajectories):
        steps = spec.trajectory_length
        actions = np.concatenate(
            [rng.uniform(-0.9, 0.9, size=(steps, 6)), rng.choice([-1.0, 1.0], size=(steps, 1))], axis=1
        ).astype(np.float32)[:, : spec.dit.action_dim]
        images = _scene(rng, spec.image_size, steps, actions)
        init_ee_pose = rng.normal(size=7).astype(np.float32)
        task = TINY_TASKS[i % len(TINY_TASKS)]
        frames = [
            {"image": images[t], "delta_action": actions[t], "init_ee_pose": init_ee_pose, "instruction": task}
            for t in range(steps)
        ]
        save_trajectory(dataset / f"traj{i}.npy", frames)
        all_actions.append(actions)
    ActionStatistics.from_actions(np.concatenate(all_actions)).to_json(folder / STATISTICS_NAME)
    return folder
