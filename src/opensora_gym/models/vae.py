"""The frame-wise image VAE that maps videos to and from the world model's latent space.

The OpenSora world model of RLinf runs on the SDXL image VAE applied to each frame on its own: a video
``[B, 3, T, H, W]`` in [-1, 1] becomes latents ``[B, 4, T, H / 8, W / 8]`` multiplied by the SDXL scaling
factor 0.13025. The VAE is a plain ``diffusers.AutoencoderKL`` stored in the checkpoint's ``vae/`` folder
(``config.json`` + ``diffusion_pytorch_model.safetensors``).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL
from einops import rearrange
from torch import nn

SDXL_SCALING_FACTOR = 0.13025
"""Latent scaling of the SDXL VAE; RLinf's ``SDXL`` factory uses it regardless of ``config.json``."""

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
_EXPECTED_LAYOUT = f"vae/{CONFIG_NAME} and vae/{WEIGHTS_NAME} (the diffusers layout of the RLinf-OpenSora checkpoints)"

Generators = torch.Generator | Sequence[torch.Generator] | None


class VideoVAE(nn.Module):
    """Encodes and decodes videos frame by frame with a diffusers ``AutoencoderKL``.

    The (B * T) frames of a batch go through the autoencoder in micro-batches of ``micro_batch_size``
    frames, which bounds activation memory and leaves results unchanged. The module is differentiable:
    wrap calls in ``torch.no_grad()`` or ``torch.inference_mode()`` when no gradient is needed.

    Args:
        autoencoder: The image VAE; its parameter names are the checkpoint's ``vae/`` keys.
        scaling_factor: Latents are the VAE's posterior samples times this factor.
        micro_batch_size: Number of frames per autoencoder call.

    Example:
        >>> vae = VideoVAE.from_pretrained("RLinf-OpenSora-LIBERO-Spatial/vae")  # doctest: +SKIP
        >>> with torch.no_grad():  # doctest: +SKIP
        ...     z = vae.encode(video, generator=torch.Generator().manual_seed(0))  # [B, 4, T, H/8, W/8]
        ...     recon = vae.decode(z)  # [B, 3, T, H, W]
    """

    def __init__(
        self,
        autoencoder: AutoencoderKL,
        scaling_factor: float = SDXL_SCALING_FACTOR,
        micro_batch_size: int = 64,
    ) -> None:
        super().__init__()
        if not isinstance(autoencoder, AutoencoderKL):
            raise TypeError(
                f"autoencoder must be a diffusers AutoencoderKL, got {type(autoencoder).__name__}; "
                "load one with VideoVAE.from_pretrained(<checkpoint>/vae)"
            )
        if isinstance(scaling_factor, bool) or not isinstance(scaling_factor, (int, float)) or scaling_factor <= 0:
            raise ValueError(f"scaling_factor must be a positive number, got {scaling_factor!r}")
        _check_micro_batch_size(micro_batch_size)
        self.autoencoder = autoencoder
        self.scaling_factor = float(scaling_factor)
        self.micro_batch_size = micro_batch_size
        self.channels_last = False

    @classmethod
    def from_pretrained(
        cls,
        folder: str | Path,
        micro_batch_size: int = 64,
        torch_dtype: torch.dtype | None = None,
        *,
        scaling_factor: float = SDXL_SCALING_FACTOR,
    ) -> VideoVAE:
        """Loads the VAE from a diffusers folder, without network access.

        Args:
            folder: The checkpoint's ``vae/`` folder itself, holding ``config.json`` and
                ``diffusion_pytorch_model.safetensors``.
            micro_batch_size: Number of frames per autoencoder call.
            torch_dtype: Dtype to load the weights in; ``None`` keeps the stored dtype.
            scaling_factor: Latent scaling; the ``scaling_factor`` in ``config.json`` is ignored, as in
                the reference.

        Raises:
            FileNotFoundError: The folder, its config or its weights are missing.
            ValueError: The weights miss keys of the config's architecture, or hold others.
        """
        _check_micro_batch_size(micro_batch_size)
        folder = Path(folder)
        if not folder.is_dir():
            raise FileNotFoundError(f"VAE folder {folder} does not exist (expected {_EXPECTED_LAYOUT})")
        for name in (CONFIG_NAME, WEIGHTS_NAME):
            if not (folder / name).is_file():
                raise FileNotFoundError(
                    f"VAE folder {folder} has no {name} (expected {_EXPECTED_LAYOUT}); pass the vae/ "
                    "subfolder itself, not the checkpoint root"
                )
        autoencoder, loading = AutoencoderKL.from_pretrained(
            folder, torch_dtype=torch_dtype, local_files_only=True, use_safetensors=True, output_loading_info=True
        )
        # diffusers only warns about missing keys and leaves those weights random: a broken VAE must not load.
        kinds = ("missing_keys", "unexpected_keys", "mismatched_keys")
        problems = {kind.replace("_", " "): loading[kind] for kind in kinds if loading[kind]}
        if problems:
            listed = "; ".join(f"{len(keys)} {kind} (first: {keys[:5]})" for kind, keys in problems.items())
            raise ValueError(f"{folder / WEIGHTS_NAME} does not match {folder / CONFIG_NAME}: {listed}")
        return cls(autoencoder, scaling_factor=scaling_factor, micro_batch_size=micro_batch_size)

    @classmethod
    def from_config(
        cls,
        config: dict[str, Any],
        micro_batch_size: int = 64,
        *,
        scaling_factor: float = SDXL_SCALING_FACTOR,
    ) -> VideoVAE:
        """Builds a VAE with random weights from an ``AutoencoderKL`` config dict (e.g. a tiny test VAE).

        Args:
            config: Keyword arguments of ``diffusers.AutoencoderKL``, as in its ``config.json``.
            micro_batch_size: Number of frames per autoencoder call.
            scaling_factor: Latent scaling.
        """
        return cls(
            AutoencoderKL.from_config(config),
            scaling_factor=scaling_factor,
            micro_batch_size=micro_batch_size,
        )

    def save_pretrained(self, folder: str | Path) -> None:
        """Writes ``config.json`` and ``diffusion_pytorch_model.safetensors`` into ``folder``.

        The micro-batch size and the scaling factor are runtime settings and are not saved.
        """
        self.autoencoder.save_pretrained(folder, safe_serialization=True)

    @property
    def latent_channels(self) -> int:
        """Channels of the latent (4 for SDXL)."""
        return self.autoencoder.config.latent_channels

    @property
    def downsample_factor(self) -> int:
        """Spatial downsampling from frames to latents (8 for SDXL)."""
        return 2 ** (len(self.autoencoder.config.block_out_channels) - 1)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def encode(self, frames: torch.Tensor, *, sample: bool = True, generator: Generators = None) -> torch.Tensor:
        """Encodes videos into scaled latents.

        Args:
            frames: Videos in [-1, 1], shape ``[B, 3, T, H, W]`` with H and W multiples of
                ``downsample_factor``; cast to the module's dtype.
            sample: Draw from the posterior (mean + std * noise), as the reference does; ``False``
                returns the posterior mean.
            generator: Source of the posterior noise. One generator draws the noise of all frames as one
                ``[(B T), C, h, w]`` tensor (the draw ``latent_dist.sample(generator)`` makes); a list of
                B generators draws item b's ``[T, C, h, w]`` noise from generator b, so an item's latents
                do not depend on the other items. ``None`` draws from a generator seeded with fresh
                entropy, leaving the global RNG untouched.

        Returns:
            Latents of shape ``[B, C, T, H / f, W / f]`` in the module's dtype, with C =
            ``latent_channels`` and f = ``downsample_factor``.
        """
        self._check_video(frames, self.autoencoder.config.in_channels, "frames", "[B, C, T, H, W]")
        batch = frames.shape[0]
        factor = self.downsample_factor
        if frames.shape[-2] % factor or frames.shape[-1] % factor:
            raise ValueError(
                f"frames height and width must be multiples of {factor} (the VAE downsampling), "
                f"got {tuple(frames.shape[-2:])}; resize or crop the frames"
            )
        generators = _resolve_generators(generator, batch) if sample else None

        images = rearrange(frames.to(dtype=self.dtype), "b c t h w -> (b t) c h w")
        means, stds = [], []
        for chunk in images.split(self.micro_batch_size):
            posterior = self.autoencoder.encode(chunk).latent_dist
            means.append(posterior.mean)
            if sample:
                stds.append(posterior.std)
        mean = torch.cat(means)  # [(B T), C, h, w]
        if sample:
            noise = _draw_noise(generators, mean)  # [(B T), C, h, w]
            latents = mean + torch.cat(stds) * noise
        else:
            latents = mean
        return rearrange(latents * self.scaling_factor, "(b t) c h w -> b c t h w", b=batch)

    def compile_decoder(self, **kwargs) -> None:
        """Decodes in the channels-last layout through a `torch.compile`d decoder.

        Channels-last convolutions run on the tensor cores without layout transposes, and compiling fuses the group
        norms with their SiLUs. The results are the eager decoder's up to float rounding. A runtime switch: nothing
        saved changes.

        Args:
            kwargs: arguments of `torch.compile` (`dynamic`, `mode`, ...).
        """
        self.autoencoder.post_quant_conv.to(memory_format=torch.channels_last)
        self.autoencoder.decoder.to(memory_format=torch.channels_last)
        self.autoencoder.decoder.compile(**kwargs)
        self.channels_last = True

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Decodes scaled latents into videos.

        Args:
            latents: Shape ``[B, C, T, h, w]`` with C = ``latent_channels``; cast to the module's dtype.

        Returns:
            Videos of shape ``[B, 3, T, h * f, w * f]`` (f = ``downsample_factor``), nominally in [-1, 1]
            but not clamped.
        """
        self._check_video(latents, self.latent_channels, "latents", "[B, C, T, h, w]")
        batch = latents.shape[0]
        codes = rearrange(latents.to(dtype=self.dtype), "b c t h w -> (b t) c h w") / self.scaling_factor
        if self.channels_last:
            codes = codes.contiguous(memory_format=torch.channels_last)
        images = [self.autoencoder.decode(chunk).sample for chunk in codes.split(self.micro_batch_size)]
        return rearrange(torch.cat(images), "(b t) c h w -> b c t h w", b=batch)  # [B, 3, T, H, W]

    @staticmethod
    def _check_video(tensor: torch.Tensor, channels: int, name: str, layout: str) -> None:
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor of shape {layout}, got {type(tensor).__name__}")
        if tensor.ndim != 5 or tensor.shape[1] != channels:
            raise ValueError(
                f"{name} must have shape {layout} with C = {channels}, got {tuple(tensor.shape)}; "
                "a single video needs a leading batch dimension"
            )
        if not tensor.is_floating_point():
            raise TypeError(
                f"{name} must be a floating-point tensor, got {tensor.dtype}; convert uint8 frames to "
                "[-1, 1] with frames / 127.5 - 1"
            )
        if tensor.numel() == 0:
            raise ValueError(f"{name} must not be empty, got shape {tuple(tensor.shape)}")


def _check_micro_batch_size(micro_batch_size: int) -> None:
    if isinstance(micro_batch_size, bool) or not isinstance(micro_batch_size, int) or micro_batch_size < 1:
        raise ValueError(f"micro_batch_size must be a positive int, got {micro_batch_size!r}")


def _resolve_generators(generator: Generators, batch: int) -> list[torch.Generator] | torch.Generator:
    """Validates ``generator`` and returns it, or a generator seeded with fresh entropy for ``None``."""
    if generator is None:
        fresh = torch.Generator()
        fresh.seed()
        return fresh
    if isinstance(generator, torch.Generator):
        return generator
    if isinstance(generator, Sequence) and all(isinstance(g, torch.Generator) for g in generator):
        if len(generator) != batch:
            raise ValueError(
                f"generator list must hold one torch.Generator per batch item ({batch}), got {len(generator)}"
            )
        return list(generator)
    raise TypeError(
        f"generator must be None, a torch.Generator or a list of {batch} torch.Generators, got {generator!r}"
    )


def _draw_noise(generators: list[torch.Generator] | torch.Generator, mean: torch.Tensor) -> torch.Tensor:
    """Standard normal noise shaped like ``mean`` ``[(B T), C, h, w]``.

    Noise is drawn in float32 on each generator's device, so a seed gives the same noise for every
    module dtype and for a CPU generator driving a GPU model.
    """
    if isinstance(generators, torch.Generator):
        noise = torch.randn(mean.shape, generator=generators, device=generators.device)
    else:
        frames_per_item = mean.shape[0] // len(generators)
        item_shape = (frames_per_item, *mean.shape[1:])  # [T, C, h, w]
        noise = torch.cat([torch.randn(item_shape, generator=g, device=g.device).to(mean.device) for g in generators])
    return noise.to(device=mean.device, dtype=mean.dtype)
