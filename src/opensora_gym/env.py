"""`OpenSoraLiberoEnv`: the world model as a vectorized Gymnasium environment.

Each sub-env is one imagined LIBERO episode. An episode starts from the first frame of a recorded trajectory,
repeated to fill the condition frames; each `step` takes a chunk of actions and predicts one frame per action.
The reward classifier scores every predicted frame.

Semantics kept from the reference (RLinf's OpenSora env), since they define the published numbers:
- a frame's reward is the classifier probability rounded to 0/1; with `use_rel_reward` the step reward of a frame
  is `reward_coef * r_t - reward_coef * r_(t-1)` (so a success counts once), else the raw `r_t`;
- a sub-env terminates when a frame's reward reaches `success_threshold`;
- `max_episode_steps` counts actions (frames), so an episode of 256 steps is 32 chunks of 8.
Changed from the reference: every counter, the randomness and the autoreset are per sub-env.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar, Literal

import gymnasium as gym
import numpy as np
import torch
from gymnasium.vector import AutoresetMode, VectorEnv
from gymnasium.vector.utils import batch_space

from opensora_gym.checkpoint import CheckpointLayout
from opensora_gym.data import TrajectoryDataset
from opensora_gym.spaces import chunk_action_space, controller_actions, observation_space
from opensora_gym.world_model import WorldModel, frames_from_uint8, frames_to_uint8

CHECKPOINT_ENV_VAR = "OPENSORA_GYM_CHECKPOINT"
HUB_IDS = {"spatial": "RLinf/RLinf-OpenSora-LIBERO-Spatial", "object": "RLinf/RLinf-OpenSora-LIBERO-Object"}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class OpenSoraLiberoConfig:
    """Settings of `OpenSoraLiberoEnv`.

    Attributes:
        num_envs: sub-envs stepped in one batch.
        checkpoint: world-model folder; None: `$OPENSORA_GYM_CHECKPOINT`, else the released model of `suite`.
        suite: `spatial` or `object`: which released checkpoint to fetch when none is given.
        device: torch device of the models.
        dtype: `bfloat16`, `float16` or `float32` for the DiT and the VAE (the reward classifier runs in float32).
        num_sampling_steps: rectified-flow steps per chunk. The released models use 10; fewer (e.g. 5 or 4) is an
            approximate mode: faster chunk steps whose frames differ from the 10-step ones (`benchmarks/env_step.py`
            measures by how much).
        action_chunk: actions (= predicted frames) per step.
        condition_frames: latent frames of context; must match the checkpoint.
        image_size: side of the frames the world model works at and of the observed image.
        max_episode_steps: actions per episode before truncation.
        use_rel_reward: reward the change of the frame reward (see the module docstring), else the raw reward.
        reward_coef: scale of the relative reward.
        success_threshold: a frame with this reward (or probability, see `success_from`) ends the episode.
        success_from: `reward`: threshold the 0/1 rounded probability, as the reference; `probability`: threshold
            the classifier's raw probability.
        group_size: consecutive sub-envs that start from the same episode (GRPO groups).
        return_frames: put the decoded chunk frames [N, A, H, W, 3] in `info["frames"]`.
        vae_micro_batch_size: frames per VAE call.
        dit_micro_batch_size: sub-envs per DiT forward (None: all at once); bounds the DiT's memory and, with
            `compile`, gives the compiled blocks one static batch size (see `RectifiedFlowConfig.micro_batch_size`).
        compile: `torch.compile` the DiT's blocks and the VAE decoder (about 2x faster chunk steps on a GPU;
            compiling takes a minute or two). Same results up to float rounding.
    """

    num_envs: int = 1
    checkpoint: str | Path | None = None
    suite: Literal["spatial", "object"] = "spatial"
    device: str = "cpu"
    dtype: str = "bfloat16"
    num_sampling_steps: int = 10
    action_chunk: int = 8
    condition_frames: int = 4
    image_size: int = 256
    max_episode_steps: int = 256
    use_rel_reward: bool = True
    reward_coef: float = 1.0
    success_threshold: float = 0.9
    success_from: Literal["reward", "probability"] = "reward"
    group_size: int = 1
    return_frames: bool = False
    vae_micro_batch_size: int = 64
    dit_micro_batch_size: int | None = None
    compile: bool = False

    def __post_init__(self):
        for name in ("num_envs", "num_sampling_steps", "action_chunk", "image_size", "max_episode_steps"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        if self.condition_frames < 1:
            raise ValueError(f"condition_frames must be a positive integer, got {self.condition_frames!r}")
        if self.group_size < 1 or self.num_envs % self.group_size:
            raise ValueError(
                f"group_size must be a positive divisor of num_envs ({self.num_envs}), got {self.group_size!r}"
            )
        if self.suite not in HUB_IDS:
            raise ValueError(f"suite must be one of {sorted(HUB_IDS)}, got {self.suite!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")
        if self.success_from not in ("reward", "probability"):
            raise ValueError(f"success_from must be 'reward' or 'probability', got {self.success_from!r}")
        if self.dit_micro_batch_size is not None and (
            not isinstance(self.dit_micro_batch_size, int) or self.dit_micro_batch_size < 1
        ):
            raise ValueError(
                f"dit_micro_batch_size must be None or a positive integer, got {self.dit_micro_batch_size!r}"
            )
        if self.max_episode_steps % self.action_chunk:
            raise ValueError(
                f"max_episode_steps ({self.max_episode_steps}) must be a multiple of action_chunk "
                f"({self.action_chunk}): episodes are stepped in whole chunks"
            )


def resolve_checkpoint(checkpoint: str | Path | None, suite: str) -> Path:
    """The checkpoint folder: the argument, else `$OPENSORA_GYM_CHECKPOINT`, else the released model from the Hub."""
    if checkpoint is None:
        checkpoint = os.environ.get(CHECKPOINT_ENV_VAR)
    if checkpoint is not None:
        return CheckpointLayout.resolve(checkpoint).root
    repo_id = HUB_IDS[suite]
    from huggingface_hub import snapshot_download

    try:
        return CheckpointLayout.resolve(snapshot_download(repo_id)).root
    except Exception as err:
        raise FileNotFoundError(
            f"no world-model checkpoint given and {repo_id} could not be fetched from the Hugging Face Hub ({err}). "
            f"Download it where there is network access (`hf download {repo_id} --local-dir <folder>`), then pass "
            f"checkpoint=<folder> or set {CHECKPOINT_ENV_VAR}=<folder>."
        ) from err


@dataclass
class SubEnvState:
    """Everything that makes up one sub-env between steps (see `OpenSoraLiberoEnv.get_state`)."""

    latents: torch.Tensor  # [C, Tc, h, w] condition latents
    image: np.ndarray  # [H, W, 3] uint8 current observation
    episode_index: int
    task: str
    elapsed_steps: int
    prev_frame_reward: float
    success_once: bool
    episode_return: float
    needs_reset: bool
    # Filled by `get_state` only: the live generators belong to the env.
    generator_state: torch.Tensor | None = field(default=None, repr=False)


class OpenSoraLiberoEnv(VectorEnv):
    """A vectorized LIBERO task imagined by the OpenSora world model.

    Observation: `{"image": [N, S, S, 3] uint8, "task": tuple of N instructions}`.
    Action: `[N, action_chunk, 7]` float32 in the robot's units as the policy emits them (gripper 1 = open,
    0 = close); converted to LIBERO's controller convention (`opensora_gym.spaces.controller_actions`) and
    normalized with the checkpoint's action q01/q99. Reward: the chunk's summed step reward `[N]`.

    Sub-envs reset on the step after they end (Gymnasium's next-step autoreset): that step ignores their action
    and returns the first observation of a new episode with reward 0.

    Args:
        num_envs, checkpoint, ...: the fields of `OpenSoraLiberoConfig`.
        world_model: an already loaded world model to use instead of loading `checkpoint` (to share one between
            envs); `checkpoint` then only locates the dataset.
    """

    metadata: ClassVar[dict] = {"autoreset_mode": AutoresetMode.NEXT_STEP, "render_modes": ["rgb_array"]}

    def __init__(self, num_envs: int = 1, *, world_model: WorldModel | None = None, render_mode=None, **kwargs):
        self.config = config = OpenSoraLiberoConfig(num_envs=num_envs, **kwargs)
        if render_mode not in (None, "rgb_array"):
            raise ValueError(f"render_mode must be None or 'rgb_array', got {render_mode!r}")
        self.render_mode = render_mode
        root = resolve_checkpoint(config.checkpoint, config.suite)
        self.world_model = world_model or WorldModel.from_pretrained(
            root,
            device=config.device,
            dtype=DTYPES[config.dtype],
            num_sampling_steps=config.num_sampling_steps,
            image_size=config.image_size,
            vae_micro_batch_size=config.vae_micro_batch_size,
            dit_micro_batch_size=config.dit_micro_batch_size,
            compile=config.compile,
        )
        if self.world_model.condition_frames != config.condition_frames:
            raise ValueError(
                f"condition_frames={config.condition_frames} but the checkpoint's STDiT3 has "
                f"{self.world_model.condition_frames} condition frames"
            )
        self.dataset = TrajectoryDataset(CheckpointLayout(root).dataset)
        self.return_frames = config.return_frames

        self.num_envs = num_envs
        self.single_action_space = chunk_action_space(config.action_chunk, self.world_model.action_dim)
        self.single_observation_space = observation_space(config.image_size)
        self.action_space = batch_space(self.single_action_space, num_envs)
        self.observation_space = batch_space(self.single_observation_space, num_envs)

        self._start_frames: dict[int, tuple[np.ndarray, str]] = {}
        self._states: list[SubEnvState] | None = None
        self._generators = [torch.Generator() for _ in range(num_envs)]
        self._episode_generator = torch.Generator()
        self._group_episodes: list[list[int]] = [[] for _ in range(num_envs // config.group_size)]
        self._episodes_started = np.zeros(num_envs, dtype=np.int64)

    # ----------------------------------------------------------------------------------------------- reset

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        """Starts a new episode in every sub-env, or in the sub-envs of `options["reset_mask"]`.

        Args:
            seed: sub-env i's generator is seeded with `seed + i` and the episode draw with `seed`; without a
                seed, the first reset seeds from the OS and later resets continue the streams.
            options: `episode_indices` ([N] ints) chooses the start trajectory of each sub-env; otherwise one
                trajectory per group of `group_size` sub-envs is drawn from the env's generator. `reset_mask`
                ([N] bool, Gymnasium's partial reset) restarts only the chosen sub-envs, exactly as the
                next-step autoreset would (same episode draw, same generators); the others are left as they are.

        Returns:
            (observation, info) of all sub-envs, with `info["episode_index"]` and `info["task"]`.
        """
        options = dict(options or {})
        unknown = set(options) - {"episode_indices", "reset_mask"}
        if unknown:
            raise ValueError(
                f"unknown reset options {sorted(unknown)}; the options are 'episode_indices' and 'reset_mask'"
            )
        episodes = options.get("episode_indices")
        if episodes is not None:
            episodes = self._check_episode_indices(episodes)
        if "reset_mask" in options:
            indices = self._check_reset_mask(options["reset_mask"], seed)
            self._restart(indices, None if episodes is None else [episodes[i] for i in indices])
            return self._observation(), self._reset_info()
        if seed is not None or self._states is None:
            base = seed if seed is not None else int(np.random.SeedSequence().entropy % 2**62)
            for i, generator in enumerate(self._generators):
                generator.manual_seed(base + i)
            self._episode_generator.manual_seed(base)
            self._group_episodes = [[] for _ in self._group_episodes]
            self._episodes_started[:] = 0
        if episodes is None:
            episodes = [self._next_group_episode(i) for i in range(self.num_envs)]
        self._states = self._start_episodes(list(range(self.num_envs)), episodes)
        return self._observation(), self._reset_info()

    def _check_reset_mask(self, mask, seed) -> list[int]:
        if self._states is None:
            raise ValueError("reset_mask needs a full reset() first: there are no episodes to restart yet")
        if seed is not None:
            raise ValueError("seed cannot be combined with reset_mask: seeds are set by a full reset")
        mask = np.asarray(mask)
        if mask.shape != (self.num_envs,) or mask.dtype != bool:
            raise ValueError(f"reset_mask must be {self.num_envs} booleans, got shape {mask.shape} of {mask.dtype}")
        return np.flatnonzero(mask).tolist()

    def _restart(self, indices: list[int], episodes: list[int] | None = None) -> None:
        """Starts the next episode of the sub-envs `indices` (their group's next draw unless `episodes` is given)."""
        if not indices:
            return
        if episodes is None:
            episodes = [self._next_group_episode(i) for i in indices]
        for i, state in zip(indices, self._start_episodes(indices, episodes), strict=True):
            self._states[i] = state

    def _check_episode_indices(self, episodes) -> list[int]:
        episodes = np.asarray(episodes)
        if episodes.shape != (self.num_envs,) or not np.issubdtype(episodes.dtype, np.integer):
            raise ValueError(
                f"episode_indices must be {self.num_envs} integers (one per sub-env), got shape {episodes.shape} "
                f"of {episodes.dtype}"
            )
        if episodes.min() < 0 or episodes.max() >= len(self.dataset):
            raise ValueError(
                f"episode_indices must lie in [0, {len(self.dataset) - 1}] ({len(self.dataset)} trajectories), "
                f"got {episodes.tolist()}"
            )
        return episodes.tolist()

    def _next_group_episode(self, env_index: int) -> int:
        """The start trajectory of sub-env `env_index`'s next episode, shared by its group.

        The k-th episode of every member of a group is the group's k-th draw, so members that end at different
        times still share their starts.
        """
        group = env_index // self.config.group_size
        k = self._episodes_started[env_index]
        drawn = self._group_episodes[group]
        while len(drawn) <= k:
            drawn.append(int(torch.randint(len(self.dataset), (1,), generator=self._episode_generator)))
        self._episodes_started[env_index] += 1
        return drawn[k]

    def _start_frame(self, episode: int) -> tuple[np.ndarray, str]:
        # Trajectory files hold every frame of an episode: read each once and keep only its first frame.
        if episode not in self._start_frames:
            self._start_frames[episode] = self.dataset.start_frame(episode)
        return self._start_frames[episode]

    def _start_episodes(self, env_indices: list[int], episodes: list[int]) -> list[SubEnvState]:
        starts = [self._start_frame(e) for e in episodes]
        images = torch.from_numpy(np.stack([image for image, _ in starts]))
        latents = self.world_model.encode_start(images, generator=[self._generators[i] for i in env_indices]).cpu()
        # The first observation goes through the same [-1, 1] round trip as in the reference.
        normalized = frames_from_uint8(images, self.config.image_size)  # [N, 3, S, S]
        observed = frames_to_uint8(normalized[:, :, None])[:, 0].numpy()  # [N, S, S, 3]
        return [
            SubEnvState(
                latents=latents[k],
                image=observed[k],
                episode_index=episode,
                task=task,
                elapsed_steps=0,
                prev_frame_reward=0.0,
                success_once=False,
                episode_return=0.0,
                needs_reset=False,
            )
            for k, (episode, (_, task)) in enumerate(zip(episodes, starts, strict=True))
        ]

    # ------------------------------------------------------------------------------------------------ step

    def step(self, actions):
        """Imagines one chunk per sub-env.

        Args:
            actions: [N, action_chunk, action_dim] in the robot's units (numpy or torch, finite).

        Returns:
            (observation, reward [N] float32, terminated [N] bool, truncated [N] bool, info).
            `info` holds `frame_rewards` [N, A] and `success_prob` [N, A] of the predicted frames, and
            `success_once`, `episode_return`, `episode_length`, `episode_index`, `task`, with `_key` masks
            (false for sub-envs that reset on this step); `frames` [N, A, S, S, 3] when `return_frames`.
        """
        if self._states is None:
            raise ValueError("step() called before reset(): call reset() first")
        actions = self._check_actions(actions)
        cfg = self.config
        n, a = self.num_envs, cfg.action_chunk
        resetting = [i for i, s in enumerate(self._states) if s.needs_reset]
        active = [i for i, s in enumerate(self._states) if not s.needs_reset]

        rewards = np.zeros(n, dtype=np.float32)
        terminated = np.zeros(n, dtype=bool)
        truncated = np.zeros(n, dtype=bool)
        frame_rewards = np.zeros((n, a), dtype=np.float32)
        success_prob = np.zeros((n, a), dtype=np.float32)
        frames = np.zeros((n, a, cfg.image_size, cfg.image_size, 3), dtype=np.uint8) if self.return_frames else None

        if active:
            latents = torch.stack([self._states[i].latents for i in active])
            prediction = self.world_model.predict_chunk(
                latents, actions[active], generator=[self._generators[i] for i in active]
            )
            new_latents = prediction.latents[:, :, -cfg.condition_frames :].cpu()
            chunk_frames = prediction.frames.cpu().numpy()  # [n_active, A, S, S, 3]
            probs = prediction.success_prob.cpu().numpy()
            for k, i in enumerate(active):
                state = self._states[i]
                step_rewards, done = self._frame_rewards(state, probs[k])
                state.latents = new_latents[k]
                state.image = chunk_frames[k, -1]
                state.elapsed_steps += a
                state.success_once |= done
                state.episode_return += float(step_rewards.sum())
                terminated[i] = done
                truncated[i] = state.elapsed_steps >= cfg.max_episode_steps
                state.needs_reset = bool(terminated[i] or truncated[i])
                rewards[i] = step_rewards.sum()
                frame_rewards[i] = step_rewards
                success_prob[i] = probs[k]
                if frames is not None:
                    frames[i] = chunk_frames[k]

        self._restart(resetting)
        info = self._step_info(active, frame_rewards, success_prob, frames)
        return self._observation(), rewards, terminated, truncated, info

    def _check_actions(self, actions) -> torch.Tensor:
        expected = (self.num_envs, *self.single_action_space.shape)
        if isinstance(actions, torch.Tensor):
            actions = actions.detach().cpu()
        else:
            actions = np.asarray(actions)
            if not np.issubdtype(actions.dtype, np.number):
                raise ValueError(f"actions must be numbers of shape {expected}, got dtype {actions.dtype}")
            actions = torch.from_numpy(actions)
        if tuple(actions.shape) != expected:
            raise ValueError(f"actions must have shape {expected}, got {tuple(actions.shape)}")
        actions = actions.float()
        if not torch.isfinite(actions).all():
            bad = sorted({int(i) for i in torch.nonzero(~torch.isfinite(actions))[:, 0]})
            raise ValueError(f"actions must be finite, got NaN or inf for sub-envs {bad}")
        # The world model was trained on LIBERO's controller actions, as the real env executes them.
        return torch.from_numpy(controller_actions(actions.numpy()))

    def _frame_rewards(self, state: SubEnvState, probs: np.ndarray) -> tuple[np.ndarray, bool]:
        """Step rewards [A] of one chunk from the classifier's probabilities [A], and whether it succeeded."""
        cfg = self.config
        frame_reward = np.round(probs).astype(np.float32)  # the reference's 0/1 reward per frame
        step_rewards = np.empty_like(frame_reward)
        prev = state.prev_frame_reward
        for t, r in enumerate(frame_reward):
            step_rewards[t] = cfg.reward_coef * r - prev if cfg.use_rel_reward else r
            prev = cfg.reward_coef * r
        state.prev_frame_reward = prev
        score = frame_reward if cfg.success_from == "reward" else probs
        return step_rewards, bool(score.max() >= cfg.success_threshold)

    # ---------------------------------------------------------------------------------------- observation

    def _observation(self) -> dict:
        return {
            "image": np.stack([s.image for s in self._states]),
            "task": tuple(s.task for s in self._states),
        }

    def _reset_info(self) -> dict:
        ones = np.ones(self.num_envs, dtype=bool)
        return {
            "episode_index": np.array([s.episode_index for s in self._states]),
            "_episode_index": ones,
            "task": np.array([s.task for s in self._states], dtype=object),
            "_task": ones.copy(),
        }

    def _step_info(self, active, frame_rewards, success_prob, frames) -> dict:
        mask = np.zeros(self.num_envs, dtype=bool)
        mask[active] = True
        info = self._reset_info()
        info.update(
            frame_rewards=frame_rewards,
            success_prob=success_prob,
            success_once=np.array([s.success_once for s in self._states]),
            episode_return=np.array([s.episode_return for s in self._states], dtype=np.float32),
            episode_length=np.array([s.elapsed_steps for s in self._states]),
        )
        for key in ("frame_rewards", "success_prob", "success_once", "episode_return", "episode_length"):
            info[f"_{key}"] = mask.copy()
        if frames is not None:
            info["frames"], info["_frames"] = frames, mask.copy()
        return info

    @property
    def episode_ended(self) -> np.ndarray:
        """[N] bool: the sub-envs whose episode ended on the last step (they reset on the next one)."""
        if self._states is None:
            return np.zeros(self.num_envs, dtype=bool)
        return np.array([s.needs_reset for s in self._states])

    def render(self) -> tuple[np.ndarray, ...] | None:
        """The current image of every sub-env, [S, S, 3] uint8 each (render_mode 'rgb_array')."""
        if self.render_mode is None or self._states is None:
            return None
        return tuple(s.image.copy() for s in self._states)

    # --------------------------------------------------------------------------------------------- state

    def get_state(self, indices: Sequence[int] | None = None) -> list[SubEnvState]:
        """Copies of the state of the chosen sub-envs (all by default), generator included."""
        if self._states is None:
            raise ValueError("get_state() called before reset(): call reset() first")
        indices = self._check_indices(indices)
        out = []
        for i in indices:
            s = self._states[i]
            values = {f.name: getattr(s, f.name) for f in fields(SubEnvState)}
            values.update(
                latents=s.latents.clone(), image=s.image.copy(), generator_state=self._generators[i].get_state()
            )
            out.append(SubEnvState(**values))
        return out

    def set_state(
        self, states: Sequence[SubEnvState], indices: Sequence[int], seeds: Sequence[int] | None = None
    ) -> None:
        """Puts `states[k]` into sub-env `indices[k]`: to restore a saved state or fork one into several sub-envs.

        Args:
            seeds: reseed the chosen sub-envs' generators instead of restoring the saved generator state, so
                forked copies of one state imagine different futures.
        """
        if self._states is None:
            raise ValueError("set_state() called before reset(): call reset() first")
        indices = self._check_indices(indices)
        if len(states) != len(indices) or (seeds is not None and len(seeds) != len(indices)):
            raise ValueError(
                f"need one state (and one seed, if given) per index: {len(indices)} indices, {len(states)} states, "
                f"{None if seeds is None else len(seeds)} seeds"
            )
        expected = tuple(self._states[0].latents.shape)
        for s in states:
            if tuple(s.latents.shape) != expected:
                raise ValueError(f"state latents must have shape {expected}, got {tuple(s.latents.shape)}")
            if seeds is None and s.generator_state is None:
                raise ValueError("a state without a generator state needs a seed: pass seeds=[...]")
        for k, (i, s) in enumerate(zip(indices, states, strict=True)):
            values = {f.name: getattr(s, f.name) for f in fields(SubEnvState)}
            values.update(latents=s.latents.clone(), image=s.image.copy())
            values["generator_state"] = None
            self._states[i] = SubEnvState(**values)
            if seeds is not None:
                self._generators[i].manual_seed(int(seeds[k]))
            else:
                self._generators[i].set_state(s.generator_state)

    def _check_indices(self, indices) -> list[int]:
        indices = list(range(self.num_envs)) if indices is None else [int(i) for i in indices]
        bad = [i for i in indices if not 0 <= i < self.num_envs]
        if bad:
            raise ValueError(f"sub-env indices must lie in [0, {self.num_envs - 1}], got {bad}")
        return indices

    def offload(self) -> None:
        """Moves the models to the CPU (to free the accelerator between rollouts)."""
        self.world_model.to("cpu")
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def onload(self) -> None:
        """Moves the models back to the configured device."""
        self.world_model.to(self.config.device)


class OpenSoraLiberoSingleEnv(gym.Env):
    """One imagined episode at a time, for `gym.make`: `OpenSoraLiberoEnv` with one sub-env, unbatched.

    `reset(options={"episode_index": i})` chooses the start trajectory. Stepping after the episode ended is an
    error (call `reset()`), as a single env has no autoreset.
    """

    metadata: ClassVar[dict] = {"render_modes": ["rgb_array"]}

    def __init__(self, render_mode=None, **kwargs):
        self.vector_env = OpenSoraLiberoEnv(1, render_mode=render_mode, **kwargs)
        self.render_mode = render_mode
        self.action_space = self.vector_env.single_action_space
        self.observation_space = self.vector_env.single_observation_space

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        options = dict(options or {})
        if "episode_index" in options:
            options["episode_indices"] = [options.pop("episode_index")]
        obs, info = self.vector_env.reset(seed=seed, options=options)
        return _first(obs), _first(info)

    def step(self, action):
        if self.vector_env.episode_ended[0]:
            raise ValueError("the episode has ended: call reset() before step()")
        action = np.asarray(action) if not isinstance(action, torch.Tensor) else action
        if tuple(action.shape) != self.action_space.shape:
            raise ValueError(f"action must have shape {self.action_space.shape}, got {tuple(action.shape)}")
        obs, reward, terminated, truncated, info = self.vector_env.step(action[None])
        return _first(obs), float(reward[0]), bool(terminated[0]), bool(truncated[0]), _first(info)

    def render(self) -> np.ndarray | None:
        frames = self.vector_env.render()
        return None if frames is None else frames[0]


def _first(batched: dict) -> dict:
    """Sub-env 0 of a batched observation or info dict (the `_key` masks are dropped)."""
    return {k: v[0] for k, v in batched.items() if not k.startswith("_")}
