"""Rectified-flow sampling of the predicted latent frames, with the condition frames held clean.

The reference integrates from noise (t = 1000) to data (t = 0) with `z <- z + v * dt`, where the model predicts
the velocity pointing from noise towards data. (diffusers' flow-match scheduler uses the opposite sign
convention; the two are not interchangeable.)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from einops import rearrange, repeat

from opensora_gym.models.stdit3 import CONDITION_TIMESTEP, KeyValue, STDiT3

Generators = torch.Generator | Sequence[torch.Generator] | None


@dataclass(frozen=True)
class RectifiedFlowConfig:
    """Settings of the sampler.

    Attributes:
        num_sampling_steps: Euler steps from noise to data. The released models sample 10; fewer (e.g. 5 or 4) is
            an approximate mode: faster, but the frames differ from those of 10 steps (`benchmarks/env_step.py`).
        num_timesteps: the training timestep scale (the model sees t in [0, num_timesteps]).
        use_timestep_transform: shift the timesteps by the image resolution, as the reference does.
        base_resolution: pixels of the image size at which the transform is the identity (512 * 512).
        transform_scale: extra factor on the transform's ratio.
        micro_batch_size: batch items per DiT forward; None runs the whole batch at once. The last micro-batch is
            padded (with copies of its last item, whose results are dropped) to this size, so the DiT always sees
            one batch size: compiled blocks then need only static shapes, and the condition frames' cached keys
            and values take memory for one micro-batch at a time. Items are independent, so the samples are the
            same as with the whole batch.
        condition_timestep: the noise level (0..num_timesteps) the condition frames are given at. The reference's
            15 (the default) gives them clean, modulated with the timestep 15. Above 15 (for a world model trained
            with condition-noise augmentation, `WorldModelTrainingConfig.condition_timestep_max`), the condition
            latents are noised to this level with noise drawn after the starting noise, and the model is told the
            level; the returned condition frames stay clean.
        action_guidance: w, guidance by the actions (not in the reference; for a world model trained with action
            dropout, `WorldModelTrainingConfig.action_dropout`): each step's velocity is `v_none + w * (v - v_none)`,
            `v_none` the model's velocity with the generated frames' actions replaced by "no action". The default
            1 is the reference's sampler (one forward per step); any other value costs a second forward per step
            and pushes the frames further in the direction the actions move them (w > 1) or less (w < 1).
    """

    num_sampling_steps: int = 10
    num_timesteps: int = 1000
    use_timestep_transform: bool = True
    base_resolution: int = 512 * 512
    transform_scale: float = 1.0
    micro_batch_size: int | None = None
    condition_timestep: float = CONDITION_TIMESTEP
    action_guidance: float = 1.0

    def __post_init__(self):
        if self.num_sampling_steps < 1:
            raise ValueError(f"num_sampling_steps must be a positive integer, got {self.num_sampling_steps}")
        if self.num_timesteps < 1:
            raise ValueError(f"num_timesteps must be a positive integer, got {self.num_timesteps}")
        if self.base_resolution < 1 or self.transform_scale <= 0:
            raise ValueError(
                "base_resolution and transform_scale must be positive, "
                f"got {self.base_resolution} and {self.transform_scale}"
            )
        if self.micro_batch_size is not None and self.micro_batch_size < 1:
            raise ValueError(f"micro_batch_size must be None or a positive integer, got {self.micro_batch_size}")
        if not CONDITION_TIMESTEP <= self.condition_timestep < self.num_timesteps:
            raise ValueError(
                f"condition_timestep must be in [{CONDITION_TIMESTEP}, {self.num_timesteps}), "
                f"got {self.condition_timestep}"
            )
        if not math.isfinite(self.action_guidance) or self.action_guidance < 0:
            raise ValueError(f"action_guidance must be a finite number >= 0, got {self.action_guidance}")


def timestep_transform(
    t: torch.Tensor,
    height: float,
    width: float,
    num_frames: int,
    num_timesteps: int = 1000,
    base_resolution: int = 512 * 512,
    scale: float = 1.0,
) -> torch.Tensor:
    """Resolution-dependent shift of timesteps on the 0..num_timesteps scale.

    `ratio * t / (1 + (ratio - 1) * t)` on t in [0, 1], with `ratio = sqrt(pixels / base_resolution) *
    sqrt(frames) * scale`. As in the reference, any clip of more than one frame counts as 4 frames (the temporal
    factor is fixed, not read from `num_frames`), so a 256 x 256 clip maps every timestep to itself.
    """
    frames = 1.0 if num_frames == 1 else 4.0
    ratio = math.sqrt(height * width / base_resolution) * math.sqrt(frames) * scale
    t = t.float() / num_timesteps
    return ratio * t / (1 + (ratio - 1) * t) * num_timesteps


def add_noise(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, num_timesteps: int = 1000) -> torch.Tensor:
    """Interpolates clean latents towards noise: `(1 - t / T) * x0 + (t / T) * noise`.

    Args:
        x0, noise: [B, C, F, h, w].
        t: [B] on the 0..num_timesteps scale.
    """
    s = (t.float() / num_timesteps)[:, None, None, None, None]  # [B, 1, 1, 1, 1]
    return (1 - s) * x0 + s * noise


def draw_noise(shape: Sequence[int], generator: Generators, device=None) -> torch.Tensor:
    """Standard normal noise [B, ...] in float32; with a list of B generators, item b uses generator b only.

    Noise is drawn on each generator's own device and then moved, so a seeded generator gives the same noise
    whatever the batch size or the neighbours of its item.
    """
    if generator is None or isinstance(generator, torch.Generator):
        gen_device = generator.device if generator is not None else device
        return torch.randn(*shape, generator=generator, device=gen_device).to(device)
    if len(generator) != shape[0]:
        raise ValueError(f"expected one generator per batch item ({shape[0]}), got {len(generator)}")
    return torch.stack([torch.randn(*shape[1:], generator=g, device=g.device) for g in generator]).to(device)


class RectifiedFlowSampler:
    """Euler sampler of the rectified flow, conditioned on clean context frames and on actions."""

    def __init__(self, config: RectifiedFlowConfig | None = None):
        self.config = config or RectifiedFlowConfig()

    def timesteps(self, height: float, width: float, num_frames: int, device=None) -> torch.Tensor:
        """The sampling timesteps [num_sampling_steps], from num_timesteps downwards, transformed if enabled."""
        cfg = self.config
        steps = torch.tensor(
            [(1.0 - i / cfg.num_sampling_steps) * cfg.num_timesteps for i in range(cfg.num_sampling_steps)],
            device=device,
        )
        if cfg.use_timestep_transform:
            steps = timestep_transform(
                steps, height, width, num_frames, cfg.num_timesteps, cfg.base_resolution, cfg.transform_scale
            )
        return steps

    @torch.no_grad()
    def sample(
        self,
        model: STDiT3,
        condition_latents: torch.Tensor,
        actions: torch.Tensor,
        *,
        height: int,
        width: int,
        noise: torch.Tensor | None = None,
        generator: Generators = None,
    ) -> torch.Tensor:
        """Generates one latent frame per action after the condition frames.

        Args:
            model: the STDiT3 velocity model.
            condition_latents: clean context [B, C, Tc, h, w].
            actions: normalized actions [B, A, action_dim]; A frames are generated.
            height, width: the image size the latents stand for.
            noise: the starting noise [B, C, A, h, w]; drawn from `generator` when not given.
            generator: a generator, or one per batch item, for the starting noise.

        Returns:
            latents [B, C, Tc + A, h, w] float32; the first Tc frames are `condition_latents` unchanged.

        As in the reference, every step moves only the generated frames; the condition frames stay clean (with
        `RectifiedFlowConfig.condition_timestep` above 15 the model sees them noised, from `generator`'s next draws).
        """
        return self.sample_draws(
            model, condition_latents, actions, height=height, width=width, noise=noise, generator=generator
        )[0]

    @torch.no_grad()
    def sample_draws(
        self,
        model: STDiT3,
        condition_latents: torch.Tensor,
        actions: torch.Tensor,
        *,
        height: int,
        width: int,
        noise: torch.Tensor | None = None,
        generator: Generators = None,
        extra_noise: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`sample`, plus D more draws of the same chunk from `extra_noise`, sharing the condition frames' cache.

        The first draw runs exactly as `sample` runs it (same shapes, same noise), so it is bitwise the sample
        `sample` returns. The extra draws of a (micro-)batch reuse its condition frames' keys and values, computed
        once and repeated D times, and go through the DiT as one more batch of D x (micro-batch) items.

        Args:
            model, condition_latents, actions, height, width, noise, generator: as for `sample`.
            extra_noise: [B, D, C, A, h, w] starting noise of the extra draws, or None for none.

        Returns:
            latents [B, C, Tc + A, h, w] as `sample`, and the extra draws' generated latents [B, D, C, A, h, w]
            float32 (None without `extra_noise`).
        """
        B, C, Tc, h, w = condition_latents.shape
        A = actions.shape[1]
        if noise is None:
            noise = draw_noise((B, C, A, h, w), generator, device=condition_latents.device)
        elif noise.shape != (B, C, A, h, w):
            raise ValueError(f"noise must have shape {(B, C, A, h, w)}, got {tuple(noise.shape)}")
        if extra_noise is not None and (extra_noise.ndim != 6 or extra_noise[:, 0].shape != (B, C, A, h, w)):
            raise ValueError(
                f"extra_noise must have shape [{B}, D, {C}, {A}, {h}, {w}], got {tuple(extra_noise.shape)}"
            )
        cond = condition_latents.float()
        z = noise.to(cond.device, torch.float32)  # [B, C, A, h, w]
        level = self.config.condition_timestep
        model_cond = cond
        if level > CONDITION_TIMESTEP:
            cond_noise = draw_noise(cond.shape, generator, device=cond.device)
            model_cond = add_noise(cond, cond_noise, cond.new_full((B,), level), self.config.num_timesteps)
        extra = None if extra_noise is None else extra_noise.to(cond.device, torch.float32)  # [B, D, C, A, h, w]
        steps = self.timesteps(height, width, Tc + A, device=z.device)
        # Micro-batches are padded to one static size; without micro-batching the whole batch runs as it is.
        size = self.config.micro_batch_size or B

        def pad(tensor: torch.Tensor) -> torch.Tensor:
            return tensor if self.config.micro_batch_size is None else _pad_batch(tensor, size)

        parts, extra_parts = [], []
        for start in range(0, B, size):
            part = slice(start, start + size)
            n = cond[part].shape[0]
            part_cond, part_actions = pad(model_cond[part]), pad(actions[part])
            # The condition frames' activations do not change between steps or draws: compute them once.
            cache = model.condition_cache(part_cond, height, width, level)
            parts.append(self._integrate(model, cache, part_actions, pad(z[part]), steps, height, width)[:n])
            if extra is not None:
                drawn = self._integrate_draws(model, cache, part_actions, pad(extra[part]), steps, height, width)
                extra_parts.append(drawn[:n])
        latents = torch.cat([cond, torch.cat(parts)], dim=2)
        return latents, (torch.cat(extra_parts) if extra is not None else None)

    def _integrate_draws(
        self,
        model: STDiT3,
        cache: list[KeyValue],
        actions: torch.Tensor,
        z: torch.Tensor,
        steps: torch.Tensor,
        height: int,
        width: int,
    ) -> torch.Tensor:
        """`_integrate` of D draws per item: `z` [m, D, C, A, h, w], the `cache` of m items repeated D times.

        Returns:
            the generated latents [m, D, C, A, h, w] float32.
        """
        m, D = z.shape[:2]
        # Keys/values are [(m s), heads, Tc, head_dim]: item i's tokens are rows i*s .. (i+1)*s - 1.
        repeated = [tuple(repeat(t, "(m s) n t d -> (m r s) n t d", m=m, r=D) for t in kv) for kv in cache]
        drawn = self._integrate(
            model,
            repeated,
            repeat(actions, "m a k -> (m r) a k", r=D),
            rearrange(z, "m r c a h w -> (m r) c a h w"),
            steps,
            height,
            width,
        )
        return rearrange(drawn, "(m r) c a h w -> m r c a h w", r=D)

    def _integrate(
        self,
        model: STDiT3,
        cache: list[KeyValue],
        actions: torch.Tensor,
        z: torch.Tensor,
        steps: torch.Tensor,
        height: int,
        width: int,
    ) -> torch.Tensor:
        """Euler steps from the noise `z` [B, C, A, h, w] along `steps`, given the condition frames' `cache`.

        Returns:
            the generated latents [B, C, A, h, w] float32.
        """
        B, C = z.shape[:2]
        guidance = self.config.action_guidance
        if guidance != 1.0:
            # One forward of 2B items per step: B with their actions, then B without (the cache is action-free).
            cache = [tuple(torch.cat([t, t]) for t in kv) for kv in cache]
            actions = torch.cat([actions, actions])
            drop = torch.arange(2 * B, device=z.device) >= B
        next_steps = torch.cat([steps[1:], steps.new_zeros(1)])
        for t, t_next in zip(steps, next_steps, strict=True):
            if guidance == 1.0:
                velocity = model.forward_generated(z, t.expand(B), actions, cache, height, width)[:, :C]
            else:
                both = model.forward_generated(torch.cat([z, z]), t.expand(2 * B), actions, cache, height, width, drop)
                with_actions, without = both[:B, :C], both[B:, :C]
                velocity = without + guidance * (with_actions - without)
            z = z + velocity * ((t - t_next) / self.config.num_timesteps)
        return z


def _pad_batch(tensor: torch.Tensor, size: int) -> torch.Tensor:
    """[n, ...] -> [size, ...] (n <= size), repeating the last item."""
    return torch.cat([tensor, tensor[-1:].expand(size - tensor.shape[0], *tensor.shape[1:])])
