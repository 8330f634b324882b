"""Training a small frame VAE (a diffusers `AutoencoderKL`) on the trajectories' frames, for low resolutions.

The loss is the L1 reconstruction of a posterior sample plus a small KL to the standard normal. After training,
the latent scale is calibrated: the env always multiplies latents by the SDXL factor 0.13025, so the encoder's
output and the decoder's input are rescaled (an exact reparametrization, see `calibrate_latent_scale`) until the
scaled latents have unit standard deviation, as the rectified flow's noise assumes.
"""

from __future__ import annotations

import math
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL

from opensora_gym.data import TrajectoryDataset
from opensora_gym.models.vae import SDXL_SCALING_FACTOR, VideoVAE
from opensora_gym.world_model import frames_from_uint8


@dataclass
class VAETrainingConfig:
    """A VAE training run.

    Attributes:
        dataset: folder of `traj*.npy` episodes.
        out: the run folder; the VAE is written to `out/vae` (config.json + diffusion_pytorch_model.safetensors).
        image_size: side the frames are resized to; a multiple of the downsampling `2 ** (len(block_out_channels) - 1)`.
        block_out_channels: channels of each encoder/decoder level (4 levels: 8x downsampling, as SDXL's).
        layers_per_block: ResNet layers per level.
        latent_channels: channels of the latent (4 for the released STDiT3).
        norm_num_groups: GroupNorm groups; divides every entry of `block_out_channels`.
        batch_size: frames per step.
        max_steps: optimizer steps.
        lr: AdamW learning rate.
        kl_weight: weight of the KL term (summed over latent elements, averaged over frames).
        calibration_frames: frames used to measure the latent scale.
        seed: initial weights, frame order and posterior samples.
        device: torch device.
        log_every: steps between printed losses.
    """

    dataset: Path
    out: Path
    image_size: int = 64
    block_out_channels: tuple[int, ...] = (64, 128, 256, 256)
    layers_per_block: int = 1
    latent_channels: int = 4
    norm_num_groups: int = 32
    batch_size: int = 32
    max_steps: int = 2000
    lr: float = 1e-4
    kl_weight: float = 1e-6
    calibration_frames: int = 256
    seed: int = 0
    device: str = "cpu"
    log_every: int = 100

    def __post_init__(self) -> None:
        self.dataset, self.out = Path(self.dataset), Path(self.out)
        self.block_out_channels = tuple(int(c) for c in self.block_out_channels)
        positive = ("image_size", "layers_per_block", "latent_channels", "norm_num_groups", "batch_size", "max_steps")
        for name in (*positive, "calibration_frames", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"VAETrainingConfig.{name} must be a positive integer, got {getattr(self, name)}")
        if not self.block_out_channels or any(c % self.norm_num_groups for c in self.block_out_channels):
            raise ValueError(
                f"VAETrainingConfig.block_out_channels must be non-empty multiples of norm_num_groups="
                f"{self.norm_num_groups}, got {self.block_out_channels}"
            )
        factor = 2 ** (len(self.block_out_channels) - 1)
        if self.image_size % factor:
            raise ValueError(
                f"VAETrainingConfig.image_size must be a multiple of the downsampling {factor}, got {self.image_size}"
            )
        if self.lr <= 0 or self.kl_weight < 0:
            raise ValueError(f"VAETrainingConfig.lr must be > 0 and kl_weight >= 0, got {self.lr} and {self.kl_weight}")

    def autoencoder_config(self) -> dict:
        """The `AutoencoderKL` keyword arguments."""
        levels = len(self.block_out_channels)
        return {
            "in_channels": 3,
            "out_channels": 3,
            "down_block_types": ["DownEncoderBlock2D"] * levels,
            "up_block_types": ["UpDecoderBlock2D"] * levels,
            "block_out_channels": list(self.block_out_channels),
            "layers_per_block": self.layers_per_block,
            "norm_num_groups": self.norm_num_groups,
            "latent_channels": self.latent_channels,
            "sample_size": self.image_size,
        }


@dataclass
class VAETrainingResult:
    """Attributes: losses (every step), the folder written, and the latent scale factor applied."""

    losses: list[float] = field(default_factory=list)
    folder: Path | None = None
    scale: float = 1.0


@torch.no_grad()
def calibrate_latent_scale(
    autoencoder: AutoencoderKL, frames: torch.Tensor, scaling_factor: float = SDXL_SCALING_FACTOR
) -> float:
    """Rescales the latent space so that `scaling_factor * posterior mean` has unit standard deviation.

    With k the factor, the posterior mean becomes `k * mean` and its log-variance `logvar + 2 log k` (rows of
    `quant_conv`), and `post_quant_conv` divides its input by k, so `decode(encode(x))` is unchanged.

    Args:
        autoencoder: the VAE (with `quant_conv` and `post_quant_conv`).
        frames: sample frames [N, 3, H, W] in [-1, 1].
        scaling_factor: the latent scaling the world model applies.

    Returns:
        k.
    """
    if autoencoder.quant_conv is None or autoencoder.post_quant_conv is None:
        raise ValueError("calibrate_latent_scale needs an AutoencoderKL with use_quant_conv and use_post_quant_conv")
    mean = autoencoder.encode(frames).latent_dist.mean  # [N, C, h, w]
    k = 1.0 / (scaling_factor * float(mean.float().std()))
    channels = autoencoder.config.latent_channels
    autoencoder.quant_conv.weight[:channels] *= k
    autoencoder.quant_conv.bias[:channels] *= k
    autoencoder.quant_conv.bias[channels:] += 2 * math.log(k)
    autoencoder.post_quant_conv.weight /= k  # [C_out, C_in, 1, 1]: divides the input
    return k


def load_frames(dataset: TrajectoryDataset) -> np.ndarray:
    """Every frame of every episode, [N, H, W, 3] uint8."""
    return np.concatenate([dataset.episode(i).images for i in range(len(dataset))])


def train_vae(config: VAETrainingConfig) -> VAETrainingResult:
    """Trains the VAE, calibrates its latent scale and writes `out/vae` (atomically, after a finiteness check)."""
    device = torch.device(config.device)
    images = torch.from_numpy(load_frames(TrajectoryDataset(config.dataset)))  # [N, H, W, 3] uint8
    generator = torch.Generator().manual_seed(config.seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        autoencoder = AutoencoderKL.from_config(config.autoencoder_config())
    autoencoder = autoencoder.to(device).train()
    optimizer = torch.optim.AdamW(autoencoder.parameters(), lr=config.lr)
    result = VAETrainingResult()
    for step in range(1, config.max_steps + 1):
        batch = torch.randint(len(images), (config.batch_size,), generator=generator)
        x = frames_from_uint8(images[batch], config.image_size).to(device)  # [B, 3, S, S]
        posterior = autoencoder.encode(x).latent_dist
        noise = torch.randn(posterior.mean.shape, generator=generator).to(device)
        recon = autoencoder.decode(posterior.mean + posterior.std * noise).sample  # [B, 3, S, S]
        loss = (recon - x).abs().mean() + config.kl_weight * posterior.kl().mean()
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite VAE loss {float(loss)} at step {step}; stopping")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        result.losses.append(float(loss.detach()))
        if step % config.log_every == 0:
            print(f"vae step {step}: loss {result.losses[-1]:.4f}")
    autoencoder.eval()
    calibration = torch.randperm(len(images), generator=generator)[: config.calibration_frames]
    result.scale = calibrate_latent_scale(
        autoencoder, frames_from_uint8(images[calibration], config.image_size).to(device)
    )
    for name, tensor in autoencoder.state_dict().items():
        if not torch.isfinite(tensor).all():
            raise FloatingPointError(f"VAE parameter {name} has non-finite values; not saving")
    folder = config.out / "vae"
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    VideoVAE(autoencoder.cpu()).save_pretrained(tmp)
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)
    result.folder = folder
    return result
