"""Tiny world-model checkpoints in the exact released layout, made on the fly: the embedded default job's world
model (`make_action_sensitive_checkpoint`) and the random-weight stand-ins of tests and benchmarks."""

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
from opensora_gym.spaces import ACTION_CHUNK

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


# Actions per chunk the classifier of `make_action_sensitive_checkpoint` is trained with (the env's default).


@dataclass(frozen=True)
class ActionSensitiveReport:
    """How well the reward classifier of `make_action_sensitive_checkpoint` separates the two sides.

    Attributes:
        folder: the checkpoint folder.
        threshold: a frame is a success when its action's first normalized number exceeds this.
        classifier_accuracy: accuracy of the rounded classifier output on held-out frames from the world model.
    """

    folder: Path
    threshold: float
    classifier_accuracy: float


def _set_action_sensitive_dit(dit: STDiT3, threshold: float, shift: float, gain: float) -> None:
    """Hand-sets STDiT3 weights so frame j's velocity is `+shift` on latent channel 0 if `a_j[0] > threshold`.

    Every weight starts at zero (so the timestep embedding, attention and temporal blocks contribute nothing).
    Then:
    - the action embedder's first Linear has two units `gain * (a0 - tau)` and `-gain * (a0 - tau)`; its second
      Linear writes `SiLU(u) - SiLU(-u) = u` to hidden unit 0 and `-u` to hidden unit 1;
    - the t_block's SiLU then sees `(u, -u)` again, and its Linear puts `SiLU(u) - SiLU(-u) = u` into every
      channel of the spatial blocks' `gate_mlp` chunk (the sixth of six);
    - spatial block 0's MLP outputs the constant zero-mean vector `c = gain * (+1, -1, +1, ...)` (fc2's bias),
      so a token becomes `pos + u * c`, dominated by `u * c` unless `a0` is within about `1 / gain**2` of tau;
    - the final LayerNorm maps that to `sign(u) * (+1, -1, ...)`, and the final Linear to a velocity of
      `shift * sign(u)` on channel 0 of every patch position.
    The rectified flow integrates the velocity over a unit of time, so the frame's latent is noise + that.
    """
    from math import prod

    cfg = dit.config
    hidden = cfg.hidden_size
    with torch.no_grad():
        for parameter in dit.parameters():
            parameter.zero_()
        first, second = dit.action_embedder.fc[0], dit.action_embedder.fc[2]
        first.weight[0, 0], first.bias[0] = gain, -gain * threshold
        first.weight[1, 0], first.bias[1] = -gain, gain * threshold
        second.weight[0, 0], second.weight[0, 1] = 1.0, -1.0
        second.weight[1, 0], second.weight[1, 1] = -1.0, 1.0
        gate_mlp = dit.t_block[1].weight[5 * hidden : 6 * hidden]  # [C, C] rows of the gate_mlp chunk
        gate_mlp[:, 0], gate_mlp[:, 1] = 1.0, -1.0
        pattern = torch.ones(hidden)
        pattern[1::2] = -1.0
        dit.spatial_blocks[0].mlp.fc2.bias.copy_(gain * pattern)
        out = cfg.out_channels
        # Output features are ordered (patch row, patch column, channel): channel 0 of each patch position.
        for position in range(prod(cfg.patch_size)):
            dit.final_layer.linear.weight[position * out] = shift * pattern / hidden


def make_action_sensitive_checkpoint(
    folder: str | Path,
    threshold: float = 0.8,
    seed: int = 0,
    image_size: int = 32,
    shift: float = 3.0,
    gain: float = 30.0,
    classifier_steps: int = 60,
    spec: TinyCheckpointSpec | None = None,
) -> ActionSensitiveReport:
    """A tiny checkpoint whose success is known: a frame succeeds iff its action's first normalized number > tau.

    The world model's STDiT3 is hand-set (see `_set_action_sensitive_dit`) so each predicted frame's latent
    carries the side of its action; the reward classifier is then trained on frames the world model predicts
    from actions on both sides of `threshold` (normalized units, as the env feeds the DiT) and its held-out
    accuracy is measured. A policy that outputs uniform normalized actions succeeds on a frame with probability
    `(1 - threshold) / 2`: with the default 0.8 that is 0.1 per action, about 57% per chunk of 8.

    Args:
        folder: where to write the checkpoint (the `make_tiny_checkpoint` layout).
        threshold: tau, in normalized action units.
        seed: weights, dataset and classifier training data.
        image_size: the frame side the env will run at (the classifier is trained at it).
        shift: the latent shift of channel 0 that encodes the side.
        gain: sharpness of the side decision (see `_set_action_sensitive_dit`).
        classifier_steps: Adam steps of the classifier.
        spec: sizes of the tiny checkpoint.

    Returns:
        the folder, the threshold and the classifier's held-out accuracy.
    """
    from einops import rearrange

    from opensora_gym.checkpoint import CheckpointLayout
    from opensora_gym.data import TrajectoryDataset
    from opensora_gym.world_model import WorldModel

    if not -1.0 < threshold < 1.0:
        raise ValueError(f"threshold must lie in (-1, 1) (normalized action units), got {threshold}")
    spec = spec or TinyCheckpointSpec()
    folder = make_tiny_checkpoint(folder, spec=spec, seed=seed)
    dit = STDiT3(spec.dit)
    _set_action_sensitive_dit(dit, threshold, shift, gain)
    dit.save_pretrained(folder, max_shard_bytes=spec.max_shard_bytes)

    model = WorldModel.from_pretrained(folder, num_sampling_steps=1, image_size=image_size)
    dataset = TrajectoryDataset(CheckpointLayout(folder).dataset)
    starts = torch.from_numpy(np.stack([dataset.start_frame(i)[0] for i in range(len(dataset))]))
    generator = torch.Generator().manual_seed(seed)

    def frames_and_labels(count: int) -> tuple[torch.Tensor, torch.Tensor]:
        """World-model frames [count * A, 3, S, S] in [-1, 1] and whether their action was above tau [count * A]."""
        latents = model.encode_start(starts[torch.randint(len(starts), (count,), generator=generator)], generator)
        normalized = torch.rand(count, ACTION_CHUNK, spec.dit.action_dim, generator=generator) * 2 - 1
        above = torch.rand(count, ACTION_CHUNK, generator=generator) < 0.5  # [count, A]
        # Half the actions on each side, uniform within the side: the classifier sees both sides equally.
        u = torch.rand(count, ACTION_CHUNK, generator=generator)
        normalized[..., 0] = torch.where(above, threshold + (1 - threshold) * u, -1 + (1 + threshold) * u)
        predicted = model.sampler.sample(
            model.dit, latents, normalized, height=image_size, width=image_size, generator=generator
        )[:, :, model.condition_frames :]  # [count, C, A, h, w]
        decoded = model.vae.decode(predicted)  # [count, 3, A, S, S]
        frames = rearrange(decoded, "n c a h w -> (n a) c h w").clamp(-1, 1)
        return frames, rearrange(above, "n a -> (n a)").float()

    with torch.no_grad():
        train_frames, train_labels = frames_and_labels(32)
        test_frames, test_labels = frames_and_labels(16)
    reward = model.reward_model.eval()  # inference batch norm: train exactly the function the env will run
    optimizer = torch.optim.Adam(reward.parameters(), lr=3e-3)
    for _ in range(classifier_steps):
        batch = torch.randint(len(train_frames), (64,), generator=generator)
        prob = reward(train_frames[batch]).clamp(1e-6, 1 - 1e-6)
        loss = torch.nn.functional.binary_cross_entropy(prob, train_labels[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        accuracy = float((reward(test_frames).round() == test_labels).float().mean())
    reward.save_pretrained(folder)
    return ActionSensitiveReport(folder=folder, threshold=threshold, classifier_accuracy=accuracy)
