"""The rectified-flow training loss of the action-conditioned STDiT3, as the reference trains it.

For clean latents x0 [B, C, Tc + A, h, w] (Tc condition frames, then A generated ones) and noise n:

1. t ~ 1000 * sigmoid(N(loc, scale)) per clip (logit-normal), then the resolution transform of the sampler;
2. the generated frames are noised to t and the condition frames to the fixed t0 = 15, with the same noise:
   x_t = (1 - t / 1000) * x0 + (t / 1000) * n;
3. the model sees x_t, the timestep t and the mask (condition frames are modulated with t0 = 15 and "no action"
   inside the model); condition-noise augmentation (an option, not the reference's) draws a higher t0 per clip,
   noises the condition frames to it and tells the model, so that it learns to continue from imperfect frames;
   action dropout (another option) gives the generated frames of some clips "no action" instead of their actions,
   so that the model also learns the chunk without them (for the sampler's action guidance);
4. the target is the velocity x0 - n, and the squared error is averaged over the generated frames only
   (per clip: the sum over generated frames and all channels and pixels, over their count), then over clips.
"""

from __future__ import annotations

import torch
from einops import reduce

from opensora_gym.models.stdit3 import CONDITION_TIMESTEP, STDiT3
from opensora_gym.rectified_flow import RectifiedFlowConfig, add_noise, timestep_transform


def sample_timesteps(
    batch: int,
    generator: torch.Generator,
    config: RectifiedFlowConfig,
    height: int,
    width: int,
    num_frames: int,
    loc: float = 0.0,
    scale: float = 1.0,
) -> torch.Tensor:
    """Logit-normal timesteps on [0, num_timesteps], shifted by the resolution transform when enabled.

    Args:
        batch: number of clips.
        generator: the source of randomness (drawn on its device).
        config: the sampler's settings (timestep scale and transform), shared with sampling.
        height, width: the image size the latents stand for.
        num_frames: frames of a clip (any number above 1 counts as 4 in the transform, as in the reference).
        loc, scale: mean and standard deviation of the normal before the sigmoid.

    Returns:
        timesteps [batch] float32, on the generator's device.
    """
    u = torch.randn(batch, generator=generator, device=generator.device) * scale + loc
    t = torch.sigmoid(u) * config.num_timesteps
    if config.use_timestep_transform:
        t = timestep_transform(
            t, height, width, num_frames, config.num_timesteps, config.base_resolution, config.transform_scale
        )
    return t


def rectified_flow_loss(
    model: STDiT3,
    x0: torch.Tensor,
    actions: torch.Tensor,
    noise: torch.Tensor,
    t: torch.Tensor,
    height: int,
    width: int,
    num_timesteps: int = 1000,
    condition_t: torch.Tensor | None = None,
    drop_actions: torch.Tensor | None = None,
) -> torch.Tensor:
    """The reference's masked velocity loss, per clip.

    Args:
        model: the STDiT3 (its `condition_frames` first frames are context).
        x0: clean latents [B, C, Tc + A, h, w].
        actions: normalized actions [B, A, action_dim], one per generated frame.
        noise: standard normal noise shaped like `x0`.
        t: timesteps [B] on the 0..num_timesteps scale.
        height, width: the image size the latents stand for.
        condition_t: [B], the noise level of each clip's condition frames, given to the model as their timestep
            (condition-noise augmentation); None: the reference's fixed t0 = 15.
        drop_actions: [B] bool, clips trained without their actions (action dropout); None: none.

    Returns:
        the loss of each clip [B] float32 (the training loss is its mean).
    """
    B, C, F = x0.shape[:3]
    condition_frames = model.config.condition_frames
    x_mask = torch.arange(F, device=x0.device)[None].expand(B, F) >= condition_frames  # [B, F], true: generated
    x_t = add_noise(x0, noise, t, num_timesteps)
    t0 = torch.full_like(t, CONDITION_TIMESTEP) if condition_t is None else condition_t
    x_t0 = add_noise(x0, noise, t0, num_timesteps)
    x_in = torch.where(x_mask[:, None, :, None, None], x_t, x_t0)
    velocity = model(x_in, t, actions, x_mask, height, width, condition_t, drop_actions)[:, :C]  # [B, C, F, h, w]
    squared_error = (velocity.float() - (x0 - noise).float()).pow(2)
    per_frame = reduce(squared_error, "b c f h w -> b f", "mean")
    mask = x_mask.float()
    return (per_frame * mask).sum(dim=1) / mask.sum(dim=1)
