"""Rollout storage and collection: chunk steps of a vector env under a policy, with explicit shapes.

Layout (time-major, as RLinf's embodied pipeline): T chunk steps, B trajectories, A actions per chunk, K action
tokens per chunk (K = A x action_dim). `rollout_epoch` passes over N sub-envs are merged as B = epochs x N
trajectories, epoch-major (trajectory `e * N + i` is sub-env i in pass e), so GRPO groups of consecutive sub-envs
stay consecutive. Each pass resets the env and keeps only the first episode of every sub-env: steps after its
first done are masked out of every loss and statistic (RLinf's `compute_loss_mask`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from einops import rearrange
from gymnasium.vector import VectorEnv

from vla_policies.base import Policy

__all__ = ["RolloutBatch", "collect_rollout", "loss_mask_from_dones", "merge_epochs"]


def loss_mask_from_dones(dones: torch.Tensor) -> torch.Tensor:
    """Valid steps of the first episode of each trajectory.

    Action `t` (counting over chunks and their actions) is valid when no done flag came before it: the action
    that ends the episode is valid, every later one is not. `dones[0]` (the state before the first step) counts
    as coming before every action, as in RLinf's `compute_loss_mask`.

    Args:
        dones: [T + 1, B, A] bool; `dones[t + 1, b, a]` ends trajectory b's episode with action a of chunk t.

    Returns:
        [T, B, A] bool.
    """
    if dones.ndim != 3 or dones.dtype != torch.bool:
        raise ValueError(f"dones must be a bool tensor of shape [T + 1, B, A], got {dones.dtype} {tuple(dones.shape)}")
    num_chunks, _, chunk = dones.shape[0] - 1, dones.shape[1], dones.shape[2]
    flat = rearrange(dones, "t b a -> (t a) b")  # [(T + 1) * A, B]
    # The last action of row 0 stands for "done before the first step"; the other entries of row 0 are unused.
    flat = flat[chunk - 1 :]  # [T * A + 1, B]
    before = torch.cumsum(flat.long(), dim=0)[:-1]  # [T * A, B]: dones up to and including the previous action
    return rearrange(before == 0, "(t a) b -> t b a", t=num_chunks, a=chunk)


@dataclass
class RolloutBatch:
    """Chunk steps of B trajectories (see the module docstring for the layout).

    Attributes:
        images: [T, B, H, W, 3] uint8 observations the chunks were chosen from.
        tasks: T tuples of B task strings.
        action_tokens: [T, B, K] int64.
        logprobs: [T, B, K] float32 log-probs of the tokens at rollout time.
        values: [T + 1, B, V] float32 value estimates (V = 1 per chunk or A per action; row T bootstraps the
            last step), or None without a value head.
        rewards: [T, B, A] float32 per-action rewards.
        dones: [T + 1, B, A] bool; `dones[t + 1]` ends an episode with chunk t (only its last action carries the
            flag, as in RLinf); `dones[0]` is false.
        loss_mask: [T, B, A] bool, the first episode of each trajectory (`loss_mask_from_dones`).
        success: [B] bool, whether the first episode succeeded.
        episode_return: [B] float32 summed reward of the first episode.
        episode_length: [B] int64 actions in the first episode.
        wm_uncertainty: [T, B] float32 `info["wm_uncertainty"]` of each chunk (0 where the sub-env was not
            stepped), or None when the env reports no reliability signal.
        wm_truncated: [B] bool, the first episode was cut by the env's `truncate` reliability policy (or None).
        wm_withheld: [B] bool, the env's `withhold` policy took a success of the first episode away (or None).
    """

    images: torch.Tensor
    tasks: list[tuple[str, ...]]
    action_tokens: torch.Tensor
    logprobs: torch.Tensor
    values: torch.Tensor | None
    rewards: torch.Tensor
    dones: torch.Tensor
    loss_mask: torch.Tensor
    success: torch.Tensor
    episode_return: torch.Tensor
    episode_length: torch.Tensor
    wm_uncertainty: torch.Tensor | None = None
    wm_truncated: torch.Tensor | None = None
    wm_withheld: torch.Tensor | None = None

    def __post_init__(self) -> None:
        T, B, A = self.rewards.shape
        K = self.action_tokens.shape[-1]
        expected = {
            "images": (T, B, *self.images.shape[2:]),
            "action_tokens": (T, B, K),
            "logprobs": (T, B, K),
            "dones": (T + 1, B, A),
            "loss_mask": (T, B, A),
            "success": (B,),
            "episode_return": (B,),
            "episode_length": (B,),
        }
        if self.values is not None:
            expected["values"] = (T + 1, B, self.values.shape[-1])
        reliability = {"wm_uncertainty": (T, B), "wm_truncated": (B,), "wm_withheld": (B,)}
        expected.update({name: shape for name, shape in reliability.items() if getattr(self, name) is not None})
        for name, shape in expected.items():
            if tuple(getattr(self, name).shape) != shape:
                raise ValueError(f"{name} must have shape {shape}, got {tuple(getattr(self, name).shape)}")
        if len(self.tasks) != T or any(len(t) != B for t in self.tasks):
            raise ValueError(f"tasks must be {T} tuples of {B} strings")

    @property
    def num_steps(self) -> int:
        """T, chunk steps."""
        return self.rewards.shape[0]

    @property
    def num_trajectories(self) -> int:
        """B."""
        return self.rewards.shape[1]


def merge_epochs(batches: list[RolloutBatch]) -> RolloutBatch:
    """Concatenates passes of the same env along the trajectory axis, epoch-major (B = epochs x N)."""
    if not batches:
        raise ValueError("merge_epochs needs at least one batch")
    if any(b.num_steps != batches[0].num_steps for b in batches):
        raise ValueError(f"every pass must have the same number of steps, got {[b.num_steps for b in batches]}")

    def cat(name: str) -> torch.Tensor | None:
        parts = [getattr(b, name) for b in batches]
        if parts[0] is None:
            return None
        return torch.cat(parts, dim=0 if parts[0].ndim == 1 else 1)

    tasks = [sum((b.tasks[t] for b in batches), ()) for t in range(batches[0].num_steps)]
    return RolloutBatch(
        images=cat("images"),
        tasks=tasks,
        action_tokens=cat("action_tokens"),
        logprobs=cat("logprobs"),
        values=cat("values"),
        rewards=cat("rewards"),
        dones=cat("dones"),
        loss_mask=cat("loss_mask"),
        success=cat("success"),
        episode_return=cat("episode_return"),
        episode_length=cat("episode_length"),
        wm_uncertainty=cat("wm_uncertainty"),
        wm_truncated=cat("wm_truncated"),
        wm_withheld=cat("wm_withheld"),
    )


@torch.no_grad()
def collect_rollout(
    env: VectorEnv,
    policy: Policy,
    num_steps: int,
    *,
    seed: int,
    generator: torch.Generator,
    temperature: float,
    top_k: int = -1,
    do_sample: bool = True,
    on_step: Callable[[], None] | None = None,
) -> RolloutBatch:
    """One pass: resets `env` with `seed` and steps it until every sub-env's first episode ended.

    The pass stops early when every first episode has ended, since later steps would be masked anyway; the
    rows it did not step are zeros with `dones` set and `loss_mask` false.

    Args:
        env: a next-step autoreset vector env with `frame_rewards` [N, A] in its step infos (`OpenSoraLiberoEnv`).
        policy: chooses the chunks.
        num_steps: T, the most chunk steps (`max_episode_steps / action_chunk`: every first episode ends by then).
        seed: the env's reset seed (start trajectories and world-model noise).
        generator: the policy's sampling generator.
        temperature, top_k, do_sample: sampling of `policy.act`.
        on_step: called after every env step (e.g. to advance a progress bar).

    Returns:
        the pass as a `RolloutBatch` with B = N.
    """
    obs, _ = env.reset(seed=seed)
    n = env.num_envs
    chunk, action_dim = policy.action_chunk, policy.action_dim
    num_tokens = chunk * action_dim
    height, width = obs["image"].shape[1:3]
    images = torch.zeros(num_steps, n, height, width, 3, dtype=torch.uint8)
    tasks: list[tuple[str, ...]] = [("",) * n for _ in range(num_steps)]
    action_tokens = torch.zeros(num_steps, n, num_tokens, dtype=torch.int64)
    logprobs = torch.zeros(num_steps, n, num_tokens)
    values: torch.Tensor | None = None
    rewards = torch.zeros(num_steps, n, chunk)
    dones = torch.zeros(num_steps + 1, n, chunk, dtype=torch.bool)
    alive = np.ones(n, dtype=bool)  # first episode still running
    success = np.zeros(n, dtype=bool)
    episode_return = np.zeros(n, dtype=np.float32)
    episode_length = np.zeros(n, dtype=np.int64)
    # Filled only when the env reports its reliability signal (`OpenSoraLiberoEnv(uncertainty=...)`).
    wm: dict[str, np.ndarray] | None = None

    steps_taken = 0
    for t in range(num_steps):
        out = policy.act(obs, do_sample=do_sample, temperature=temperature, top_k=top_k, generator=generator)
        images[t] = torch.from_numpy(np.asarray(obs["image"]))
        tasks[t] = tuple(str(task) for task in obs["task"])
        action_tokens[t] = out.action_tokens.cpu()
        logprobs[t] = out.logprobs.float().cpu()
        if out.values is not None:
            if values is None:
                values = torch.zeros(num_steps + 1, n, out.values.shape[-1])
            values[t] = out.values.float().cpu()
        obs, _, terminated, truncated, info = env.step(out.actions)
        steps_taken = t + 1
        stepped = np.asarray(info["_frame_rewards"])
        frame_rewards = np.where(stepped[:, None], info["frame_rewards"], 0.0).astype(np.float32)  # [N, A]
        rewards[t] = torch.from_numpy(frame_rewards)
        ended = np.asarray(terminated) | np.asarray(truncated)
        dones[t + 1, :, -1] = torch.from_numpy(ended)
        ending = alive & ended
        if "wm_uncertainty" in info:
            if wm is None:
                wm = {"uncertainty": np.zeros((num_steps, n), np.float32), "truncated": np.zeros(n, bool)}
                wm["withheld"] = np.zeros(n, bool)
            wm["uncertainty"][t] = np.where(stepped, info["wm_uncertainty"], 0.0)
            wm["truncated"] |= ending & np.asarray(info["wm_truncated"])
            wm["withheld"] |= alive & stepped & np.asarray(info["wm_withheld"])
        success[ending] = np.asarray(info["success_once"])[ending]
        episode_return[ending] = np.asarray(info["episode_return"])[ending]
        episode_length[ending] = np.asarray(info["episode_length"])[ending]
        alive &= ~ended
        if on_step is not None:
            on_step()
        if not alive.any():
            break

    dones[steps_taken + 1 :] = True
    if alive.any():
        # First episodes cut by `num_steps` report where they stopped.
        success[alive] = np.asarray(info["success_once"])[alive]
        episode_return[alive] = np.asarray(info["episode_return"])[alive]
        episode_length[alive] = np.asarray(info["episode_length"])[alive]
    if values is not None and alive.any():
        # First episodes cut by `num_steps` bootstrap from the value of the observation they stopped at.
        out = policy.act(obs, do_sample=do_sample, temperature=temperature, top_k=top_k, generator=generator)
        values[steps_taken] = out.values.float().cpu()
    return RolloutBatch(
        images=images,
        tasks=tasks,
        action_tokens=action_tokens,
        logprobs=logprobs,
        values=values,
        rewards=rewards,
        dones=dones,
        loss_mask=loss_mask_from_dones(dones),
        success=torch.from_numpy(success),
        episode_return=torch.from_numpy(episode_return),
        episode_length=torch.from_numpy(episode_length),
        wm_uncertainty=None if wm is None else torch.from_numpy(wm["uncertainty"]),
        wm_truncated=None if wm is None else torch.from_numpy(wm["truncated"]),
        wm_withheld=None if wm is None else torch.from_numpy(wm["withheld"]),
    )
