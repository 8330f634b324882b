"""Training clips of a trajectory folder: 4 condition + 8 generated frames and the 8 actions between them.

Alignment (the reference's `SimpleVLAWebDataset` windows): a clip at `start` has the condition frames
`start - Tc + 1 .. start` (indices below 0 repeat frame 0, as an episode starts from its first frame repeated) and
the generated frames `start + 1 .. start + A`. In our trajectory layout frame k holds the action executed from
frame k, so generated frame `start + 1 + j` is paired with `delta_action[start + j]`: each generated frame gets the
action that produced it, as in the env, where a chunk's j-th action yields its j-th frame. Starts run from 0 while
the last generated frame exists.

The VAE runs once per frame: `encode_latents` writes the posterior mean and standard deviation of every frame
(scaled latents, float16) to one safetensors file, and training draws a fresh posterior sample per clip, as the
reference's `vae.encode` does each step.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from einops import rearrange
from safetensors import safe_open
from safetensors.torch import save_file

from opensora_gym.data import ActionStatistics, TrajectoryDataset
from opensora_gym.models.vae import VideoVAE
from opensora_gym.world_model import frames_from_uint8


def clip_starts(num_frames: int, generated_frames: int) -> range:
    """The clip starts of an episode of `num_frames` frames (empty when it is too short)."""
    return range(max(num_frames - generated_frames, 0))


@torch.no_grad()
def encode_latents(
    dataset: TrajectoryDataset,
    vae: VideoVAE,
    image_size: int,
    path: str | Path,
    device: torch.device | str = "cpu",
) -> Path:
    """Encodes every frame of every episode once and writes the latent cache.

    The file holds `mean` and `std` [N, C, h, w] float16 (scaled posterior parameters of all N frames, episode
    after episode), `actions` [N, A] float32 as recorded, and `offsets` [E + 1] int64 (episode e is frames
    `offsets[e]:offsets[e + 1]`); its metadata names the image size and the episode files.

    Returns:
        the path written.
    """
    path = Path(path)
    means, stds, actions, offsets = [], [], [], [0]
    vae = vae.to(device).eval()
    for index in range(len(dataset)):
        episode = dataset.episode(index)
        frames = frames_from_uint8(torch.from_numpy(episode.images), image_size).to(device, vae.dtype)  # [T,3,S,S]
        for chunk in frames.split(vae.micro_batch_size):
            posterior = vae.autoencoder.encode(chunk).latent_dist
            means.append((posterior.mean * vae.scaling_factor).half().cpu().contiguous())  # [t, C, h, w]
            stds.append((posterior.std * vae.scaling_factor).half().cpu().contiguous())
        actions.append(torch.from_numpy(episode.actions))
        offsets.append(offsets[-1] + len(episode.images))
    tensors = {
        "mean": torch.cat(means),
        "std": torch.cat(stds),
        "actions": torch.cat(actions),
        "offsets": torch.tensor(offsets, dtype=torch.int64),
    }
    for name in ("mean", "std"):
        if not torch.isfinite(tensors[name]).all():
            raise FloatingPointError(f"the VAE gave non-finite latent {name}s (float16 overflow?); cache not written")
    metadata = {"image_size": str(image_size), "episodes": json.dumps([p.name for p in dataset.paths])}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, path, metadata=metadata)
    return path


@dataclass
class LatentClips:
    """The clips of a latent cache, batched with normalized actions.

    Attributes:
        mean, std: scaled posterior parameters of every frame [N, C, h, w] float16.
        actions: recorded actions [N, action_dim] float32.
        offsets: episode boundaries [E + 1] int64.
        image_size: the frame side the latents were encoded at.
        condition_frames, generated_frames: Tc and A of a clip.
    """

    mean: torch.Tensor
    std: torch.Tensor
    actions: torch.Tensor
    offsets: torch.Tensor
    image_size: int
    condition_frames: int = 4
    generated_frames: int = 8

    def __post_init__(self) -> None:
        if self.condition_frames < 1 or self.generated_frames < 1:
            raise ValueError(
                f"condition_frames and generated_frames must be positive, got {self.condition_frames} and "
                f"{self.generated_frames}"
            )
        starts = []  # (global index of the clip's frame `start`, first and last global frame of its episode)
        for first, end in zip(self.offsets[:-1].tolist(), self.offsets[1:].tolist(), strict=True):
            starts += [(first, first + s) for s in clip_starts(end - first, self.generated_frames)]
        if not starts:
            raise ValueError(
                f"no episode has more than {self.generated_frames} frames: no clip of {self.condition_frames} + "
                f"{self.generated_frames} frames can be cut (record longer episodes)"
            )
        self._starts = torch.tensor(starts, dtype=torch.int64)  # [num_clips, 2]

    @classmethod
    def load(cls, path: str | Path, condition_frames: int = 4, generated_frames: int = 8) -> LatentClips:
        """Reads a cache written by `encode_latents`."""
        with safe_open(Path(path), framework="pt") as f:
            tensors = {key: f.get_tensor(key) for key in ("mean", "std", "actions", "offsets")}
            image_size = int(f.metadata()["image_size"])
        return cls(
            **tensors, image_size=image_size, condition_frames=condition_frames, generated_frames=generated_frames
        )

    def __len__(self) -> int:
        return len(self._starts)

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """(C, h, w) of one latent frame."""
        return tuple(self.mean.shape[1:])

    def frame_indices(self, clips: torch.Tensor) -> torch.Tensor:
        """Global frame indices [B, Tc + A] of `clips` [B], frame 0 of the episode repeated before its start."""
        first, start = self._starts[clips].unbind(dim=1)  # [B] each
        offsets = torch.arange(-self.condition_frames + 1, self.generated_frames + 1)  # [Tc + A]
        return torch.maximum(start[:, None] + offsets[None], first[:, None])

    def previous_chunk(self, clips: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The clips one chunk (A frames) earlier in the same episode, whose generated frames end at the last
        condition frame of `clips` [B]: the chunk a rollout would have generated before it.

        Returns:
            a mask [B] of the clips that have one (their start is at least A frames into the episode) and the
            earlier clips' indices [B] (meaningful where the mask is set).
        """
        first, start = self._starts[clips].unbind(dim=1)  # [B] each
        return start - first >= self.generated_frames, clips - self.generated_frames

    def batch(
        self, clips: torch.Tensor, statistics: ActionStatistics, generator: torch.Generator | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Latents and normalized actions of `clips`.

        Args:
            clips: clip indices [B].
            statistics: q01/q99 for the action normalization.
            generator: draws the posterior samples; None returns the posterior means.

        Returns:
            latents [B, C, Tc + A, h, w] float32 and actions [B, A, action_dim] float32.
        """
        frames = self.frame_indices(clips)  # [B, Tc + A]
        latents = self.mean[frames].float()  # [B, Tc + A, C, h, w]
        if generator is not None:
            noise = torch.randn(latents.shape, generator=generator, device=generator.device).to(latents.device)
            latents = latents + self.std[frames].float() * noise
        starts = self._starts[clips, 1]
        action_frames = starts[:, None] + torch.arange(self.generated_frames)[None]  # [B, A]
        actions = statistics.normalize(self.actions[action_frames])  # [B, A, action_dim]
        return rearrange(latents, "b f c h w -> b c f h w"), actions
