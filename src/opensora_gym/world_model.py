"""The world model as the components compose it: start frames -> latents, and (latents, actions) -> next chunk.

One chunk step: actions [N, A, 7] in robot units -> normalized with the checkpoint's q01/q99 -> STDiT3 sampled
by the rectified flow from the condition latents [N, C, Tc, h, w] and fresh noise -> predicted latents
[N, C, A, h, w] -> VAE decode -> frames [N, A, H, W, 3] -> reward classifier per frame.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from einops import rearrange

from opensora_gym.checkpoint import CheckpointLayout
from opensora_gym.data import ActionStatistics
from opensora_gym.models.float8 import check_fp8_device
from opensora_gym.models.reward import ResNetRewardModel
from opensora_gym.models.stdit3 import CONDITION_TIMESTEP, STDiT3, kernel_available
from opensora_gym.models.vae import VideoVAE
from opensora_gym.rectified_flow import Generators, RectifiedFlowConfig, RectifiedFlowSampler, draw_noise
from opensora_gym.reliability import draw_disagreement


@dataclass(frozen=True)
class ChunkPrediction:
    """The outcome of one chunk step for N sub-envs and A actions.

    Attributes:
        latents: predicted latent frames [N, C, A, h, w] (the next condition frames are the last Tc of them).
        frames: decoded frames [N, A, H, W, 3] uint8.
        success_prob: the reward classifier's probability per frame [N, A] float32.
        draw_disagreement: with K > 1 draws, `opensora_gym.reliability.draw_disagreement` of the K draws' latents
            [N] float32 (draw 0 is `latents`); None with one draw.
    """

    latents: torch.Tensor
    frames: torch.Tensor
    success_prob: torch.Tensor
    draw_disagreement: torch.Tensor | None = None


def frames_to_uint8(frames: torch.Tensor) -> torch.Tensor:
    """[N, 3, T, H, W] in [-1, 1] -> [N, T, H, W, 3] uint8, truncating as the reference does."""
    frames = ((frames.float() + 1.0) / 2.0 * 255.0).clamp(0, 255).to(torch.uint8)
    return rearrange(frames, "n c t h w -> n t h w c")


def frames_from_uint8(images: torch.Tensor, image_size: int) -> torch.Tensor:
    """[N, H, W, 3] uint8 -> [N, 3, image_size, image_size] in [-1, 1], resized bilinearly if needed."""
    x = rearrange(images, "n h w c -> n c h w").float() / 255.0
    if x.shape[-2:] != (image_size, image_size):
        x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False)
    return (x - 0.5) / 0.5


class WorldModel:
    """STDiT3, sampler, VAE, reward classifier and action statistics of one checkpoint.

    Args:
        dit: the velocity model; vae: the frame autoencoder; reward_model: the success classifier.
        statistics: action q01/q99 for normalization.
        sampler: the rectified-flow sampler.
        image_size: side of the square frames the model works at.
    """

    def __init__(
        self,
        dit: STDiT3,
        vae: VideoVAE,
        reward_model: ResNetRewardModel,
        statistics: ActionStatistics,
        sampler: RectifiedFlowSampler,
        image_size: int,
    ):
        if image_size % vae.downsample_factor:
            raise ValueError(
                f"image_size must be a multiple of the VAE downsample factor {vae.downsample_factor}, got {image_size}"
            )
        self.dit, self.vae, self.reward_model = dit, vae, reward_model
        self.statistics = statistics
        self.sampler = sampler
        self.image_size = image_size

    @classmethod
    def from_pretrained(
        cls,
        folder: str | Path,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        num_sampling_steps: int = 10,
        condition_timestep: float = CONDITION_TIMESTEP,
        action_guidance: float = 1.0,
        image_size: int = 256,
        vae_micro_batch_size: int = 64,
        dit_micro_batch_size: int | None = None,
        compile: bool = False,
        dit_fp8_linears: bool = False,
    ) -> WorldModel:
        """Loads every part of a checkpoint folder in the released layout (see `opensora_gym.checkpoint`).

        The DiT and the VAE run in `dtype`; the reward classifier always runs in float32, as in the reference.
        `dit_micro_batch_size` sub-envs go through the sampler at a time (`RectifiedFlowConfig.micro_batch_size`);
        `condition_timestep` is the level the condition frames are given at (`RectifiedFlowConfig`; 15: clean),
        `action_guidance` the sampler's guidance by the actions (`RectifiedFlowConfig`; 1: none, the reference's).
        `compile` compiles the DiT's blocks with `torch.compile`, for static shapes when `dit_micro_batch_size` is
        set (the sampler pads to it) and for any batch size otherwise, and the VAE decoder in the channels-last
        layout (worth it on a GPU; the first chunk is slower); on a CUDA device it also runs the temporal attention
        of the generated frames as one fused Triton kernel (`STDiT3.set_temporal_attention("triton")`) and each
        MLP's fc1 with its GELU as one matmul (`STDiT3.set_fused_gelu`), and compiles the per-head QK-norms as
        one-pass reductions (`STDiT3.compile_blocks(one_pass_head_norms=True)`). None of these changes the results
        beyond float rounding. Two approximate modes: `num_sampling_steps` below the released 10, and
        `dit_fp8_linears`, which runs the linears of the DiT blocks as FP8 matmuls (`STDiT3.use_fp8_linears`; on a
        GPU it needs compute capability >= 8.9, checked before anything loads).
        """
        if dit_fp8_linears:
            check_fp8_device(device)
        layout = CheckpointLayout.resolve(folder)
        vae = VideoVAE.from_pretrained(layout.vae, micro_batch_size=vae_micro_batch_size, torch_dtype=dtype)
        vae = vae.to(device).eval()
        dit = STDiT3.from_pretrained(layout.root, device=device, dtype=dtype)
        if dit_fp8_linears:
            dit.use_fp8_linears()
        if compile:
            on_gpu = torch.device(device).type == "cuda"
            if on_gpu and kernel_available is not None:  # README, "Speed"
                dit.set_temporal_attention("triton")
                dit.set_fused_gelu(not dit_fp8_linears)
            dit.compile_blocks(dynamic=dit_micro_batch_size is None, one_pass_head_norms=on_gpu)
            vae.compile_decoder()
        return cls(
            dit=dit,
            vae=vae,
            reward_model=ResNetRewardModel.from_pretrained(layout.reward_weights).to(device),
            statistics=ActionStatistics.from_json(layout.statistics),
            sampler=RectifiedFlowSampler(
                RectifiedFlowConfig(
                    num_sampling_steps=num_sampling_steps,
                    micro_batch_size=dit_micro_batch_size,
                    condition_timestep=condition_timestep,
                    action_guidance=action_guidance,
                )
            ),
            image_size=image_size,
        )

    @property
    def device(self) -> torch.device:
        return self.vae.device

    @property
    def condition_frames(self) -> int:
        return self.dit.config.condition_frames

    @property
    def action_dim(self) -> int:
        return self.dit.config.action_dim

    def to(self, device: torch.device | str) -> WorldModel:
        """Moves the models (to offload them between rollouts, or back)."""
        for module in (self.dit, self.vae, self.reward_model):
            module.to(device)
        return self

    @torch.no_grad()
    def encode_start(self, images: torch.Tensor, generator: Generators = None) -> torch.Tensor:
        """Start frames [N, H, W, 3] (or condition frames [N, Tc, H, W, 3]) uint8 -> condition latents [N, C, Tc,
        h, w].

        As in the reference, a start frame is repeated to fill the condition frames; each condition frame is
        encoded with its own latent sample.
        """
        if images.ndim == 4:
            images = images[:, None].expand(-1, self.condition_frames, -1, -1, -1)
        if images.shape[1] != self.condition_frames:
            raise ValueError(
                f"expected {self.condition_frames} condition frames [N, Tc, H, W, 3], got shape {tuple(images.shape)}"
            )
        x = frames_from_uint8(images.flatten(0, 1).to(self.device), self.image_size)  # [N * Tc, 3, S, S]
        # Contiguous: the VAE's convolutions round differently on the channels-last layout that the uint8 frames give.
        x = rearrange(x, "(n t) c h w -> n c t h w", n=len(images)).contiguous()  # [N, 3, Tc, S, S]
        return self.vae.encode(x.to(self.vae.dtype), sample=True, generator=generator).float()

    @torch.no_grad()
    def predict_chunk(
        self,
        condition_latents: torch.Tensor,
        actions: torch.Tensor,
        generator: Generators = None,
        *,
        num_draws: int = 1,
        draw_generator: Generators = None,
    ) -> ChunkPrediction:
        """Predicts the frames that follow `condition_latents` under `actions` (robot units).

        With `num_draws` K > 1 the chunk is also sampled K - 1 more times from noise of `draw_generator`, sharing
        the condition frames' cache (`RectifiedFlowSampler.sample_draws`); only draw 0 is decoded and scored, and
        it is bitwise the prediction of `num_draws=1`, since `generator` is used for draw 0 only. The extra draws
        cost (K - 1) times the DiT sampling, no decode.

        Args:
            condition_latents: [N, C, Tc, h, w].
            actions: [N, A, action_dim] in the robot's units (normalized here with q01/q99).
            generator: a generator, or one per sub-env, for the starting noise of draw 0.
            num_draws: K, draws of the chunk (1: no disagreement is computed).
            draw_generator: a generator, or one per sub-env, for the K - 1 extra draws' noise.
        """
        if num_draws < 1:
            raise ValueError(f"num_draws must be a positive integer, got {num_draws}")
        normalized = self.statistics.normalize(actions.float().to(self.device))
        n, c, _, h, w = condition_latents.shape
        extra_noise = None
        if num_draws > 1:
            shape = (n, num_draws - 1, c, actions.shape[1], h, w)
            extra_noise = draw_noise(shape, draw_generator, device=self.device)  # [N, K - 1, C, A, h, w]
        sampled, extra = self.sampler.sample_draws(
            self.dit,
            condition_latents.to(self.device),
            normalized.to(self.dit.dtype),
            height=self.image_size,
            width=self.image_size,
            generator=generator,
            extra_noise=extra_noise,
        )
        latents = sampled[:, :, self.condition_frames :]  # [N, C, A, h, w]
        decoded = self.vae.decode(latents.to(self.vae.dtype))  # [N, 3, A, H, W]
        prob = self.reward_model(rearrange(decoded, "n c t h w -> (n t) c h w"))  # [N * A]
        disagreement = None
        if extra is not None:
            disagreement = draw_disagreement(torch.cat([latents[:, None], extra], dim=1))  # of [N, K, C, A, h, w]
        return ChunkPrediction(
            latents=latents,
            frames=frames_to_uint8(decoded),
            success_prob=rearrange(prob, "(n t) -> n t", n=latents.shape[0]),
            draw_disagreement=disagreement,
        )
