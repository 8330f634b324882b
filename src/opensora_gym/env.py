"""`OpenSoraLiberoEnv`: the world model as a vectorized Gymnasium environment.

The env composes three objects and keeps the per-sub-env bookkeeping: the world model (`opensora_gym.world_model`:
one chunk step, start-frame encoding), the start sampler (`opensora_gym.starts`: where each episode starts) and the
reward rule (`opensora_gym.reward_rule`: the reference's rewards and termination). Its manual is the docstring of
`OpenSoraLiberoEnv`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
import torch
from gymnasium.vector import AutoresetMode, VectorEnv
from gymnasium.vector.utils import batch_space

from opensora_gym.checkpoint import HUB_IDS, CheckpointLayout, resolve_checkpoint
from opensora_gym.data import TrajectoryDataset
from opensora_gym.models.stdit3 import CONDITION_TIMESTEP
from opensora_gym.reliability import classifier_uncertainty
from opensora_gym.reward_rule import RewardRule
from opensora_gym.single import SingleEpisodeEnv, make_time_limit
from opensora_gym.spaces import (
    ACTION_CHUNK,
    ACTION_DIM,
    chunk_action_space,
    controller_actions,
    observation_space,
    reset_mask_indices,
)
from opensora_gym.starts import GIVEN_START, Start, StartSampler, check_start_frame
from opensora_gym.world_model import ChunkPrediction, WorldModel, frames_from_uint8, frames_to_uint8

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# torch.Generator.manual_seed takes seeds in [0, 2**64).
MAX_SEED = 2**64 - 1


@dataclass(frozen=True)
class OpenSoraLiberoConfig:
    """Settings of `OpenSoraLiberoEnv` (the number of sub-envs is the env's `num_envs` argument, not a setting).

    Attributes:
        checkpoint: world-model folder; None: `$OPENSORA_GYM_CHECKPOINT`, else the released model of `suite`.
        suite: `spatial` or `object`: which released checkpoint to fetch when none is given.
        device: torch device of the models.
        dtype: `bfloat16`, `float16` or `float32` for the DiT and the VAE (the reward classifier runs in float32).
        num_sampling_steps: rectified-flow steps per chunk. The released models use 10; fewer (e.g. 5 or 4) is an
            approximate mode: faster chunk steps whose frames differ from the 10-step ones (`benchmarks/env_step.py`
            measures by how much).
        condition_timestep: the noise level (0..1000) at which the DiT sees the condition frames: 15, the
            reference's, gives them clean; a world model trained with condition-noise augmentation
            (`train-world-model --condition-timestep-max`) can be sampled with a higher level, which noises the
            condition latents (from the sub-env's generator) so that the drift of its own frames matters less.
        action_guidance: w, the sampler's guidance by the actions (`RectifiedFlowConfig.action_guidance`): 1, the
            reference's, samples as trained; another value (for a world model trained with action dropout,
            `train-world-model --action-dropout`) mixes each step's velocity with the one predicted without the
            actions, `v_none + w * (v - v_none)`, at the cost of a second DiT forward per step, so that the frames
            follow the actions more (w > 1) or less (w < 1).
        action_chunk: actions (= predicted frames) per step.
        condition_frames: latent frames of context; must match the checkpoint.
        image_size: side of the frames the world model works at and of the observed image.
        max_episode_steps: actions per episode before truncation.
        start_frame: the frame of a recorded trajectory that an episode starts from, with the recorded frames
            before it as the condition (`opensora_gym.starts`): 0, the reference's, starts from the first frame
            (repeated to fill the condition frames); another index starts later (a trajectory shorter than that
            starts from its last frame); `"end-K"` starts K frames before each trajectory's last frame (or from its
            first frame, if it has no more than K), so that short episodes (`max_episode_steps` about K) end where
            the recording does: near its outcome, within the few chunks that a small world model keeps it over;
            `"random"` draws the frame uniformly from the trajectory's frames (per group draw, as the trajectory),
            so that short episodes start in every phase of the task.
        use_rel_reward: reward the change of the frame reward (see `opensora_gym.reward_rule`), else the raw reward.
        reward_coef: scale of the relative reward.
        success_threshold: a frame with this reward (or probability, see `success_from`) ends the episode.
        success_from: `reward`: threshold the 0/1 rounded probability, as the reference; `probability`: threshold
            the classifier's raw probability.
        group_size: consecutive sub-envs that start from the same episode (GRPO groups); a divisor of the env's
            `num_envs` (`opensora_gym.starts.StartSampler` checks it).
        return_frames: put the decoded chunk frames [N, A, H, W, 3] in `info["frames"]`.
        vae_micro_batch_size: frames per VAE call.
        dit_micro_batch_size: sub-envs per DiT forward (None: all at once); bounds the DiT's memory and, with
            `compile`, gives the compiled blocks one static batch size (see `RectifiedFlowConfig.micro_batch_size`).
        compile: `torch.compile` the DiT's blocks and the VAE decoder, and on a CUDA GPU run the fused temporal
            attention and fc1 + GELU kernels (about 2.5x faster chunk steps on a GPU; compiling takes a minute or
            two). Same results up to float rounding.
        dit_fp8_linears: an approximate mode, off by default: the linears of the DiT blocks (attention qkv and
            proj, MLP fc1 and fc2) run as FP8 matmuls (`torch._scaled_mm`): weights quantized once to float8 e4m3
            with one scale per output channel, activations per token at every call; the embedders and the final
            layer keep `dtype` (`STDiT3.use_fp8_linears`). Needs the CPU or a CUDA GPU of compute capability >= 8.9
            (checked when the env is made). The frames differ from exact mode's (`benchmarks/env_step.py`, rung
            `fp8`, measures by how much); a runtime choice, the checkpoint is unchanged.
        uncertainty: the per-chunk reliability signal in `info["wm_uncertainty"]` (`opensora_gym.reliability`):
            `off`; `draws`: the disagreement of `uncertainty_draws` samples of the chunk (mean per-element std of
            their latents; costs `uncertainty_draws - 1` more DiT samplings per chunk, no decode); `margin`: the
            reward classifier's closeness to its 0.5 threshold, `1 - 2 * min_t |p_t - 0.5|` (free); `random`: a
            placebo control, a uniform draw in [0, 1) per chunk from the sub-env's second generator (the extra
            draws' one; free). It passes a threshold of `1 - p` with probability p whatever was predicted, to tell
            a signal's effect apart from that of cutting episodes as often.
        uncertainty_draws: K, samples per chunk for `draws` (>= 2). Draw 0 is the one the env steps with, from
            the sub-env's generator as without the option; draws 1..K-1 come from a second generator per sub-env,
            seeded from the sub-env's seed, so turning the signal on changes no observation or reward.
        uncertainty_policy: what the signal does when it exceeds `uncertainty_threshold`: `report` (nothing),
            `truncate` (the sub-env's episode is truncated after this chunk) or `withhold` (a chunk that would
            succeed gets no reward and does not terminate; the relative reward's baseline stays at the frame reward
            before the chunk, so a later confident success still counts once).
        uncertainty_threshold: the threshold of `truncate` and `withhold` (fires when the signal is strictly above).
    """

    checkpoint: str | Path | None = None
    suite: Literal["spatial", "object"] = "spatial"
    device: str = "cpu"
    dtype: str = "bfloat16"
    num_sampling_steps: int = 10
    condition_timestep: float = CONDITION_TIMESTEP
    action_guidance: float = 1.0
    action_chunk: int = ACTION_CHUNK
    condition_frames: int = 4
    image_size: int = 256
    max_episode_steps: int = 256
    start_frame: int | str = 0
    use_rel_reward: bool = True
    reward_coef: float = 1.0
    success_threshold: float = 0.9
    success_from: Literal["reward", "probability"] = "reward"
    group_size: int = 1
    return_frames: bool = False
    vae_micro_batch_size: int = 64
    dit_micro_batch_size: int | None = None
    compile: bool = False
    dit_fp8_linears: bool = False
    uncertainty: Literal["off", "draws", "margin", "random"] = "off"
    uncertainty_draws: int = 2
    uncertainty_policy: Literal["report", "truncate", "withhold"] = "report"
    uncertainty_threshold: float | None = None

    def __post_init__(self):
        for name in ("num_sampling_steps", "action_chunk", "image_size", "max_episode_steps", "group_size"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        if not isinstance(self.condition_timestep, int | float) or not (
            CONDITION_TIMESTEP <= self.condition_timestep < 1000
        ):
            raise ValueError(
                f"condition_timestep must be a number in [{CONDITION_TIMESTEP}, 1000), got {self.condition_timestep!r}"
            )
        if (
            not isinstance(self.action_guidance, int | float)
            or not math.isfinite(self.action_guidance)
            or self.action_guidance < 0
        ):
            raise ValueError(f"action_guidance must be a finite number >= 0, got {self.action_guidance!r}")
        check_start_frame(self.start_frame)
        if self.condition_frames < 1:
            raise ValueError(f"condition_frames must be a positive integer, got {self.condition_frames!r}")
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
        if not isinstance(self.dit_fp8_linears, bool):
            raise ValueError(f"dit_fp8_linears must be True or False, got {self.dit_fp8_linears!r}")
        if self.max_episode_steps % self.action_chunk:
            raise ValueError(
                f"max_episode_steps ({self.max_episode_steps}) must be a multiple of action_chunk "
                f"({self.action_chunk}): episodes are stepped in whole chunks"
            )
        if self.uncertainty not in ("off", "draws", "margin", "random"):
            raise ValueError(f"uncertainty must be 'off', 'draws', 'margin' or 'random', got {self.uncertainty!r}")
        if not isinstance(self.uncertainty_draws, int) or self.uncertainty_draws < 2:
            raise ValueError(f"uncertainty_draws must be an integer >= 2, got {self.uncertainty_draws!r}")
        if self.uncertainty_policy not in ("report", "truncate", "withhold"):
            raise ValueError(
                f"uncertainty_policy must be 'report', 'truncate' or 'withhold', got {self.uncertainty_policy!r}"
            )
        if self.uncertainty_policy != "report":
            if self.uncertainty == "off":
                raise ValueError(
                    f"uncertainty_policy {self.uncertainty_policy!r} needs a signal: set uncertainty to 'draws', "
                    "'margin' or 'random'"
                )
            if self.uncertainty_threshold is None or not np.isfinite(self.uncertainty_threshold):
                raise ValueError(
                    f"uncertainty_policy {self.uncertainty_policy!r} needs a finite uncertainty_threshold, got "
                    f"{self.uncertainty_threshold!r}"
                )


@dataclass
class SubEnvState:
    """Everything that makes up one sub-env between steps (see `OpenSoraLiberoEnv.get_state`)."""

    latents: torch.Tensor  # [C, Tc, h, w] condition latents
    image: np.ndarray  # [H, W, 3] uint8 current observation
    episode_index: int  # the start trajectory, or GIVEN_START
    task: str
    elapsed_steps: int
    prev_frame_reward: float
    success_once: bool
    episode_return: float
    needs_reset: bool
    # Filled by `get_state` only: the live generators (draw 0's and the signal's) belong to the env.
    generator_state: torch.Tensor | None = field(default=None, repr=False)
    draw_generator_state: torch.Tensor | None = field(default=None, repr=False)


class OpenSoraLiberoEnv(VectorEnv):
    """A LIBERO task imagined by the OpenSora world model, as a natively batched Gymnasium vector env.

    ## Description

    Each of the N sub-envs is one imagined LIBERO episode. A step takes a chunk of actions per sub-env and the
    world model (`opensora_gym.world_model.WorldModel`: DiT, rectified-flow sampler, VAE, reward classifier)
    predicts one frame per action; the classifier scores every predicted frame. The env composes the world model,
    a start sampler (`opensora_gym.starts.StartSampler`) and a reward rule (`opensora_gym.reward_rule.RewardRule`),
    and keeps each sub-env's counters, generators and state. Rewards, termination and start frames follow RLinf's
    OpenSora env, so the published numbers carry over; changed from it: every counter, the randomness and the
    autoreset are per sub-env.

    ## Action Space

    `Box(-1, 1, (N, action_chunk, 7), float32)`: per sub-env a chunk of `action_chunk` (8) actions in the robot's
    units as the policy emits them: six end-effector deltas and the gripper (1 = open, 0 = close). They are
    converted to LIBERO's controller convention (`opensora_gym.spaces.controller_actions`) and normalized with the
    checkpoint's action q01/q99. Values outside the Box are clipped to it, as LIBERO's controller clips them;
    actions that are not real numbers raise TypeError, NaN/inf or a wrong shape ValueError.

    ## Observation Space

    `Dict`: `image`, `Box(0, 255, (N, S, S, 3), uint8)`, the last predicted frame at `image_size` S (after a reset,
    the start frame); `task`, a tuple of the N instructions (`Text`).

    ## Rewards

    A frame's reward is the classifier's probability rounded to 0/1. With `use_rel_reward` (default) a frame's step
    reward is `reward_coef * (r_t - r_(t-1))`, carried over between chunks and 0 before an episode's first frame,
    so a success counts once; otherwise it is the raw `r_t`. The step's reward `[N]` float32 is the sum over the
    chunk, `info["frame_rewards"]` `[N, A]` the frame rewards and `info["success_prob"]` `[N, A]` the
    probabilities. Rewards are always finite: a world model that predicts NaN/inf latents or probabilities raises
    FloatingPointError and the step changes no sub-env.

    ## Starting State

    The first frame of a recorded trajectory of the checkpoint's dataset, resized to S, encoded by the VAE and
    repeated to fill the `condition_frames`. Each group of `group_size` consecutive sub-envs starts its k-th
    episode from the group's k-th draw, uniform over the trajectories, from a generator seeded with the first
    sub-env's seed; `info["episode_index"]` and `info["task"]` say which. `reset(options=...)` can choose the
    trajectories (`episode_indices`), start from given frames (`start_images` with `start_tasks`;
    `episode_index` -1) or restart only some sub-envs (`reset_mask`): see `reset`.

    ## Episode End

    1. Termination: a frame of the chunk reaches `success_threshold` (its 0/1 reward by default, so a probability
       of 0.5 or more; with `success_from="probability"` the raw probability).
    2. Truncation: the episode has taken `max_episode_steps` actions (256 = 32 chunks of 8 by default).
    3. With an `uncertainty` signal: `uncertainty_policy="truncate"` truncates the episode after a chunk whose
       signal is above `uncertainty_threshold`; `"withhold"` takes such a chunk's success away (no reward, no
       termination).

    A sub-env resets on the step after it ends (`AutoresetMode.NEXT_STEP`): that step ignores its action and
    returns the first observation of a new episode with reward 0 and masked infos (`info["_frame_rewards"]`).

    ## Arguments

    `OpenSoraLiberoEnv(num_envs, *, world_model=None, render_mode=None, **config)`, or
    `gym.make_vec("OpenSoraLibero-Spatial-v0", num_envs=N, **config)` (also `-Object`); `gym.make` gives one
    episode at a time (`OpenSoraLiberoSingleEnv`; `-Spatial-Image-v0` observes the image alone, for
    Stable-Baselines3). `config` is any field of `OpenSoraLiberoConfig`, which
    documents them all; the main ones:

    | Parameter            | Type        | Default       | Description                                             |
    |----------------------|-------------|---------------|---------------------------------------------------------|
    | `checkpoint`         | str or Path | None          | world-model folder (None: `$OPENSORA_GYM_CHECKPOINT`,    |
    |                      |             |               | else the released model of `suite`)                     |
    | `device`, `dtype`    | str         | cpu, bfloat16 | where and in which precision the DiT and the VAE run    |
    | `num_sampling_steps` | int         | 10            | rectified-flow steps per chunk (fewer is approximate)   |
    | `dit_fp8_linears`    | bool        | False         | FP8 matmuls in the DiT blocks (approximate; a GPU needs |
    |                      |             |               | compute capability >= 8.9)                              |
    | `image_size`         | int         | 256           | S, the side of the frames                               |
    | `max_episode_steps`  | int         | 256           | actions per episode, a multiple of `action_chunk`       |
    | `start_frame`        | int or str  | 0             | the recorded start frame, `end-K` or `random`           |
    | `use_rel_reward`     | bool        | True          | reward the change of the frame reward                   |
    | `reward_coef`        | float       | 1.0           | scale of the relative reward                            |
    | `success_threshold`  | float       | 0.9           | the frame reward (or probability) that terminates       |
    | `group_size`         | int         | 1             | consecutive sub-envs that share their starts            |
    | `uncertainty`        | str         | off           | `off`, `draws`, `margin` or `random` (a placebo):       |
    |                      |             |               | `info["wm_uncertainty"]`                                |

    `world_model` is an already loaded `WorldModel` to share between envs instead of loading `checkpoint` (which
    then only locates the dataset); its image size, condition frames and action width must match the config.

    Seeding follows Gymnasium's vector envs: `reset(seed=s)` seeds sub-env i with `s + i`, `reset(seed=[s0, s1,
    ...])` with one seed each (None: from the OS); `np_random_seed` reports the seeds in use. `reset`, `step` and
    `set_state` check all their arguments before they change any sub-env; errors are the ones Gymnasium's own
    vector envs raise (TypeError for a wrong type, ValueError for a wrong value). `get_state` / `set_state` save,
    restore and fork sub-envs.

    ## Version History

    * v0: the only version so far. It changed in place while the package was built, before any release: actions
      became the policy's gripper convention (converted for the controller, as RLinf does) and are clipped to the
      Box; the `reset_mask` and `start_images` reset options, the `uncertainty` signal with its policies (off by
      default) and the `start_frame` setting (default 0, the reference's start) were added.

    ## Example

        >>> import gymnasium as gym
        >>> import opensora_gym  # registers the ids
        >>> env = gym.make_vec("OpenSoraLibero-Spatial-v0", num_envs=4, group_size=2)  # doctest: +SKIP
        >>> obs, info = env.reset(seed=0)  # doctest: +SKIP
        >>> obs["image"].shape, info["episode_index"][0] == info["episode_index"][1]  # doctest: +SKIP
        ((4, 256, 256, 3), True)
        >>> obs, reward, terminated, truncated, info = env.step(env.action_space.sample())  # doctest: +SKIP
        >>> reward.shape, info["frame_rewards"].shape  # doctest: +SKIP
        ((4,), (4, 8))
    """

    # render_fps: playback rate of the predicted frames (one per action), as `RecordEpisodeVideo` writes them.
    metadata: ClassVar[dict] = {
        "autoreset_mode": AutoresetMode.NEXT_STEP,
        "render_modes": ["rgb_array"],
        "render_fps": 10,
    }

    def __init__(self, num_envs: int = 1, *, world_model: WorldModel | None = None, render_mode=None, **kwargs):
        if not isinstance(num_envs, int) or num_envs < 1:
            raise ValueError(f"num_envs must be a positive integer, got {num_envs!r}")
        self.config = config = OpenSoraLiberoConfig(**kwargs)
        if render_mode not in (None, "rgb_array"):
            raise ValueError(f"render_mode must be None or 'rgb_array', got {render_mode!r}")
        self.render_mode = render_mode
        root = resolve_checkpoint(config.checkpoint, config.suite)
        # The starts come first: a group size that does not divide num_envs fails before a model loads.
        self.dataset = TrajectoryDataset(CheckpointLayout(root).dataset)
        self.start_sampler = StartSampler(
            self.dataset, num_envs, config.group_size, config.start_frame, config.condition_frames
        )
        self.world_model = world_model or WorldModel.from_pretrained(
            root,
            device=config.device,
            dtype=DTYPES[config.dtype],
            num_sampling_steps=config.num_sampling_steps,
            condition_timestep=config.condition_timestep,
            action_guidance=config.action_guidance,
            image_size=config.image_size,
            vae_micro_batch_size=config.vae_micro_batch_size,
            dit_micro_batch_size=config.dit_micro_batch_size,
            compile=config.compile,
            dit_fp8_linears=config.dit_fp8_linears,
        )
        self._check_world_model()
        self.reward_rule = RewardRule(
            use_rel_reward=config.use_rel_reward,
            reward_coef=config.reward_coef,
            success_threshold=config.success_threshold,
            success_from=config.success_from,
            uncertainty_policy=config.uncertainty_policy,
            uncertainty_threshold=config.uncertainty_threshold,
        )
        self.return_frames = config.return_frames

        self.num_envs = num_envs
        self.single_action_space = chunk_action_space(config.action_chunk, self.world_model.action_dim)
        self.single_observation_space = observation_space(config.image_size)
        self.action_space = batch_space(self.single_action_space, num_envs)
        self.observation_space = batch_space(self.single_observation_space, num_envs)

        self._states: list[SubEnvState] | None = None
        self._generators = [torch.Generator() for _ in range(num_envs)]
        # The signal's randomness (the extra draws of `uncertainty="draws"`, the values of `"random"`) has its own
        # streams, so the frames, rewards and episode ends are those without the signal.
        self._draw_generators = [torch.Generator() for _ in range(num_envs)]
        self._seeds: list[int | None] = [None] * num_envs

    def _check_world_model(self) -> None:
        """A shared world model must work at the config's sizes: it is not reloaded from `checkpoint`."""
        cfg, model = self.config, self.world_model
        expected = {
            "image_size": (cfg.image_size, model.image_size),
            "condition_frames": (cfg.condition_frames, model.condition_frames),
            "action_dim": (ACTION_DIM, model.action_dim),
            "dit_fp8_linears": (cfg.dit_fp8_linears, model.dit.fp8_linears),
            "condition_timestep": (cfg.condition_timestep, model.sampler.config.condition_timestep),
            "action_guidance": (cfg.action_guidance, model.sampler.config.action_guidance),
        }
        wrong = [f"{name} {want} (world model: {got})" for name, (want, got) in expected.items() if want != got]
        if wrong:
            raise ValueError(
                f"the world model does not match the env config: expected {', '.join(wrong)}; load it with the "
                "env's settings (WorldModel.from_pretrained(..., image_size=...)) or change the config"
            )

    @property
    def np_random_seed(self) -> tuple[int | None, ...]:
        """The seed of each sub-env's generator: None before the first reset, -1 after `set_state` restored a
        generator state (its seed is unknown)."""
        return tuple(self._seeds)

    # ----------------------------------------------------------------------------------------------- reset

    def reset(self, *, seed: int | Sequence[int | None] | None = None, options: dict[str, Any] | None = None):
        """Starts a new episode in every sub-env, or in the sub-envs of `options["reset_mask"]`.

        Every argument is checked before any sub-env changes.

        Args:
            seed: an int `s` seeds sub-env i's generator with `s + i`, a list with one seed per sub-env (an int,
                or None for a seed from the OS) seeds each with its own; the episode draw is seeded with the first
                sub-env's seed. Seeds are ints (Python or numpy) in [0, 2**64 - 1]. Without a seed, the first
                reset seeds from the OS and later resets continue the streams.
            options: `episode_indices` ([N] ints) chooses the start trajectory of each sub-env; otherwise one
                trajectory per group of `group_size` sub-envs is drawn from the env's generator. `start_images`
                ([N, H, W, 3] uint8) with `start_tasks` (N instructions) starts each sub-env from a given frame
                instead of a recorded one (e.g. the frame the LIBERO simulator renders, to compare the two: see
                `opensora_gym.audit`); the frame must be in the orientation of the dataset's frames (the LIBERO
                env's) and goes through the same resize and VAE encoding as a dataset start frame. Such sub-envs
                report `episode_index` -1 (`GIVEN_START`); their later autoresets draw recorded starts as usual.
                `reset_mask`
                ([N] numpy bool with at least one True, Gymnasium's partial reset) restarts only the chosen
                sub-envs, exactly as the next-step autoreset would (their group's next episode draw); with a seed,
                the chosen sub-envs' generators are reseeded first (`s + i` or the list's i-th seed) and the
                others' seeds are ignored. The other sub-envs are left as they are.

        Returns:
            (observation, info) of all sub-envs, with `info["episode_index"]` and `info["task"]`.
        """
        options = dict(options or {})
        allowed = ["episode_indices", "reset_mask", "start_images", "start_tasks"]
        unknown = set(options) - set(allowed)
        if unknown:
            raise ValueError(f"unknown reset options {sorted(unknown)}; the options are {allowed}")
        seeds = self._check_seeds(seed)
        episodes, given = self.start_sampler.check_options(options)
        if "reset_mask" in options:
            indices = self._check_reset_mask(options["reset_mask"])
            if seeds is not None:
                self._seed_generators({i: seeds[i] for i in indices})
            self._restart(indices, episodes, given)
            return self._observation(), self._reset_info()
        if seeds is not None or self._states is None:
            seeds = seeds or [None] * self.num_envs
            seeds = [self._os_seed() if s is None else s for s in seeds]
            self._seed_generators(dict(enumerate(seeds)))
            self.start_sampler.seed(seeds[0])
        indices = list(range(self.num_envs))
        self._states = self._start_episodes(indices, self.start_sampler.next_starts(indices, episodes, given))
        return self._observation(), self._reset_info()

    def _check_seeds(self, seed) -> list[int | None] | None:
        """One seed (or None) per sub-env, as Gymnasium's vector envs number them; None when no seed is given."""
        if seed is None:
            return None
        if _is_int(seed):
            seeds = [int(seed) + i for i in range(self.num_envs)]
        elif isinstance(seed, (Sequence, np.ndarray)) and not isinstance(seed, str):
            if len(seed) != self.num_envs:
                raise ValueError(f"seed must be an int or {self.num_envs} seeds (one per sub-env), got {len(seed)}")
            if not all(s is None or _is_int(s) for s in seed):
                raise TypeError(f"seeds must be ints or None, got {[type(s).__name__ for s in seed]}")
            seeds = [None if s is None else int(s) for s in seed]
        else:
            raise TypeError(
                f"seed must be an int, {self.num_envs} ints or None (one per sub-env), got {type(seed).__name__}"
            )
        bad = [s for s in seeds if s is not None and not 0 <= s <= MAX_SEED]
        if bad:
            numbering = f" (seed + i for sub-env i of {self.num_envs})" if _is_int(seed) else ""
            raise ValueError(f"seeds must lie in [0, 2**64 - 1]{numbering}, got {bad}")
        return seeds

    @staticmethod
    def _os_seed() -> int:
        return int(np.random.SeedSequence().entropy % 2**62)

    def _seed_generators(self, seeds: dict[int, int | None]) -> None:
        """Seeds the generators of the given sub-envs (None: a seed from the OS) and records the seeds."""
        for i, s in seeds.items():
            s = self._os_seed() if s is None else s
            self._generators[i].manual_seed(s)
            self._draw_generators[i].manual_seed(_draw_seed(s))
            self._seeds[i] = s

    def _check_reset_mask(self, mask) -> list[int]:
        indices = reset_mask_indices(mask, self.num_envs)
        if self._states is None:
            raise ValueError("reset_mask needs a full reset() first: there are no episodes to restart yet")
        return indices

    def _restart(self, indices: list[int], episodes: list[int] | None = None, given: list[Start] | None = None) -> None:
        """Starts the next episode of the sub-envs `indices`: from their `given` starts ([N] or None), else their
        `episodes` ([N] or None), else their groups' next draws."""
        if not indices:
            return  # the step's autoreset with no sub-env to restart
        starts = self.start_sampler.next_starts(indices, episodes, given)
        for i, state in zip(indices, self._start_episodes(indices, starts), strict=True):
            self._states[i] = state

    def _start_episodes(self, env_indices: list[int], starts: list[Start]) -> list[SubEnvState]:
        """New states of the sub-envs `env_indices`, from their `starts`."""
        context = self.config.condition_frames
        frames = torch.from_numpy(np.stack([start.condition(context) for start in starts]))  # [n, Tc, H, W, 3]
        latents = self.world_model.encode_start(frames, generator=[self._generators[i] for i in env_indices]).cpu()
        _check_finite(latents, "start latents", env_indices)
        # The first observation goes through the same [-1, 1] round trip as in the reference.
        normalized = frames_from_uint8(frames[:, -1], self.config.image_size)  # [N, 3, S, S]
        observed = frames_to_uint8(normalized[:, :, None])[:, 0].numpy()  # [N, S, S, 3]
        return [
            SubEnvState(
                latents=latents[k],
                image=observed[k],
                episode_index=start.episode_index,
                task=start.task,
                elapsed_steps=0,
                prev_frame_reward=0.0,
                success_once=False,
                episode_return=0.0,
                needs_reset=False,
            )
            for k, start in enumerate(starts)
        ]

    # ------------------------------------------------------------------------------------------------ step

    def step(self, actions):
        """Imagines one chunk per sub-env.

        Args:
            actions: [N, action_chunk, action_dim] real numbers in the robot's units (numpy or torch, finite);
                values outside the action space's [-1, 1] are clipped to it.

        Raises:
            TypeError: the actions are not real numbers. ValueError: a wrong shape, NaN or inf.
            FloatingPointError: the world model predicted NaN/inf latents or probabilities (no sub-env changed).

        Returns:
            (observation, reward [N] float32, terminated [N] bool, truncated [N] bool, info).
            `info` holds `frame_rewards` [N, A] and `success_prob` [N, A] of the predicted frames, and
            `success_once`, `episode_return`, `episode_length`, `episode_index`, `task`, with `_key` masks
            (false for sub-envs that reset on this step); `frames` [N, A, S, S, 3] when `return_frames`. With
            `uncertainty` on: `wm_uncertainty` [N] float32 (the chunk's signal), `wm_truncated` [N] bool (the
            `truncate` policy ended the episode) and `wm_withheld` [N] bool (the `withhold` policy took a success
            away), masked the same way.
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

        reliability = None
        if cfg.uncertainty != "off":
            reliability = {
                "wm_uncertainty": np.zeros(n, dtype=np.float32),
                "wm_truncated": np.zeros(n, dtype=bool),
                "wm_withheld": np.zeros(n, dtype=bool),
            }

        if active:
            latents = torch.stack([self._states[i].latents for i in active])
            prediction = self.world_model.predict_chunk(
                latents,
                actions[active],
                generator=[self._generators[i] for i in active],
                num_draws=cfg.uncertainty_draws if cfg.uncertainty == "draws" else 1,
                draw_generator=[self._draw_generators[i] for i in active],
            )
            _check_finite(prediction.latents, "latents", active)
            new_latents = prediction.latents[:, :, -cfg.condition_frames :].cpu()
            _check_finite(prediction.success_prob, "success probabilities", active)
            chunk_frames = prediction.frames.cpu().numpy()  # [n_active, A, S, S, 3]
            probs = prediction.success_prob.cpu().numpy()
            uncertainty = self._uncertainty(active, prediction, probs)  # [n_active] or None
            for k, i in enumerate(active):
                state = self._states[i]
                outcome = self.reward_rule(
                    probs[k], state.prev_frame_reward, None if uncertainty is None else uncertainty[k]
                )
                if reliability is not None:
                    reliability["wm_uncertainty"][i] = uncertainty[k]
                    reliability["wm_truncated"][i] = outcome.truncated
                    reliability["wm_withheld"][i] = outcome.withheld
                state.latents = new_latents[k]
                state.image = chunk_frames[k, -1]
                state.elapsed_steps += a
                state.prev_frame_reward = outcome.baseline
                state.success_once |= outcome.terminated
                state.episode_return += float(outcome.rewards.sum())
                terminated[i] = outcome.terminated
                truncated[i] = state.elapsed_steps >= cfg.max_episode_steps or outcome.truncated
                state.needs_reset = bool(terminated[i] or truncated[i])
                rewards[i] = outcome.rewards.sum()
                frame_rewards[i] = outcome.rewards
                success_prob[i] = probs[k]
                if frames is not None:
                    frames[i] = chunk_frames[k]

        self._restart(resetting)
        info = self._step_info(active, frame_rewards, success_prob, frames, reliability)
        return self._observation(), rewards, terminated, truncated, info

    def _uncertainty(self, active: list[int], prediction: ChunkPrediction, probs: np.ndarray) -> np.ndarray | None:
        """The configured signal [n_active] float32 of the sub-envs `active` (None when off), from their chunk's
        prediction and probabilities [n_active, A]."""
        if self.config.uncertainty == "draws":
            return prediction.draw_disagreement.cpu().numpy()
        if self.config.uncertainty == "margin":
            return classifier_uncertainty(probs)
        if self.config.uncertainty == "random":
            return np.array([torch.rand((), generator=self._draw_generators[i]).item() for i in active], np.float32)
        return None

    def _check_actions(self, actions) -> torch.Tensor:
        expected = (self.num_envs, *self.single_action_space.shape)
        if isinstance(actions, torch.Tensor):
            actions = actions.detach().cpu()
            actions = (actions.float() if actions.is_floating_point() else actions).numpy()  # numpy has no bfloat16
        else:
            actions = np.asarray(actions)
        is_real = np.issubdtype(actions.dtype, np.integer) or np.issubdtype(actions.dtype, np.floating)
        if not is_real:
            raise TypeError(f"actions must be real numbers of shape {expected}, got dtype {actions.dtype}")
        if actions.shape != expected:
            raise ValueError(f"actions must have shape {expected}, got {actions.shape}")
        actions = actions.astype(np.float32)
        if not np.isfinite(actions).all():
            bad = np.flatnonzero(~np.isfinite(actions).all(axis=(1, 2))).tolist()
            raise ValueError(f"actions must be finite, got NaN or inf for sub-envs {bad}")
        # As LIBERO's controller clips them: the world model never saw actions outside the action space.
        actions = np.clip(actions, self.single_action_space.low, self.single_action_space.high)
        # The world model was trained on LIBERO's controller actions, as the real env executes them.
        return torch.from_numpy(controller_actions(actions))

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

    def _step_info(self, active, frame_rewards, success_prob, frames, reliability) -> dict:
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
        for key, value in (reliability or {}).items():
            info[key], info[f"_{key}"] = value, mask.copy()
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
                latents=s.latents.clone(),
                image=s.image.copy(),
                generator_state=self._generators[i].get_state(),
                draw_generator_state=self._draw_generators[i].get_state(),
            )
            out.append(SubEnvState(**values))
        return out

    def set_state(
        self, states: Sequence[SubEnvState], indices: Sequence[int], seeds: Sequence[int] | None = None
    ) -> None:
        """Puts `states[k]` into sub-env `indices[k]`: to restore a saved state or fork one into several sub-envs.

        Every state is checked before any sub-env changes: the field types, the latents' shape, float32 dtype and
        finiteness, the image's shape and uint8 dtype, the episode index, the step count (0 to
        `max_episode_steps`), finite rewards, and the generator state (or a seed).

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
        if seeds is not None and not all(_is_int(s) and 0 <= s <= MAX_SEED for s in seeds):
            raise ValueError(f"seeds must be ints in [0, 2**64 - 1], got {list(seeds)}")
        for k, state in enumerate(states):
            self._check_state(state, f"states[{k}]", needs_generator=seeds is None)
        for k, (i, s) in enumerate(zip(indices, states, strict=True)):
            values = {f.name: getattr(s, f.name) for f in fields(SubEnvState)}
            values.update(latents=s.latents.clone(), image=s.image.copy())
            values["generator_state"] = values["draw_generator_state"] = None
            self._states[i] = SubEnvState(**values)
            if seeds is not None:
                self._seed_generators({i: int(seeds[k])})
            else:
                self._generators[i].set_state(s.generator_state)
                self._draw_generators[i].set_state(s.draw_generator_state)
                self._seeds[i] = -1

    def _check_state(self, state: SubEnvState, name: str, needs_generator: bool) -> None:
        if not isinstance(state, SubEnvState):
            raise TypeError(f"{name} must be a SubEnvState (from get_state), got {type(state).__name__}")
        integer, real, flag = (int, np.integer), (float, int, np.floating, np.integer), (bool, np.bool_)
        types = {
            "latents": (torch.Tensor,),
            "image": (np.ndarray,),
            "episode_index": integer,
            "task": (str,),
            "elapsed_steps": integer,
            "prev_frame_reward": real,
            "success_once": flag,
            "episode_return": real,
            "needs_reset": flag,
            "generator_state": (torch.Tensor, type(None)),
            "draw_generator_state": (torch.Tensor, type(None)),
        }
        for field_name, kinds in types.items():
            value = getattr(state, field_name)
            if not isinstance(value, kinds) or (kinds != flag and isinstance(value, bool)):
                expected = " or ".join(kind.__name__ for kind in kinds)
                raise TypeError(f"{name}.{field_name} must be {expected}, got {type(value).__name__}")
        latents = self._states[0].latents
        if state.latents.shape != latents.shape or state.latents.dtype != latents.dtype:
            raise ValueError(
                f"{name}.latents must be {latents.dtype} of shape {tuple(latents.shape)}, got "
                f"{state.latents.dtype} of shape {tuple(state.latents.shape)}"
            )
        if not torch.isfinite(state.latents).all():
            raise ValueError(f"{name}.latents must be finite, got NaN or inf")
        image_shape = (self.config.image_size, self.config.image_size, 3)
        if state.image.shape != image_shape or state.image.dtype != np.uint8:
            raise ValueError(
                f"{name}.image must be uint8 of shape {image_shape}, got {state.image.dtype} of shape "
                f"{state.image.shape}"
            )
        if not (0 <= state.episode_index < len(self.dataset) or state.episode_index == GIVEN_START):
            raise ValueError(
                f"{name}.episode_index must lie in [0, {len(self.dataset) - 1}] or be {GIVEN_START} (a given start "
                f"image), got {state.episode_index}"
            )
        if not 0 <= state.elapsed_steps <= self.config.max_episode_steps:
            raise ValueError(
                f"{name}.elapsed_steps must lie in [0, {self.config.max_episode_steps}], got {state.elapsed_steps}"
            )
        if not (np.isfinite(state.prev_frame_reward) and np.isfinite(state.episode_return)):
            raise ValueError(
                f"{name} rewards must be finite, got prev_frame_reward={state.prev_frame_reward}, "
                f"episode_return={state.episode_return}"
            )
        if needs_generator:
            for field_name in ("generator_state", "draw_generator_state"):
                generator_state = getattr(state, field_name)
                if generator_state is None:
                    raise ValueError(f"{name} has no {field_name}: pass seeds=[...] to seed its sub-env instead")
                try:
                    torch.Generator().set_state(generator_state)
                except RuntimeError as err:
                    raise ValueError(f"{name}.{field_name} is not a CPU torch.Generator state: {err}") from err

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


class OpenSoraLiberoSingleEnv(SingleEpisodeEnv):
    """One imagined episode at a time, for `gym.make`: `OpenSoraLiberoEnv` with one sub-env, unbatched.

    `reset(options={"episode_index": i})` chooses the start trajectory. Stepping after the episode ended is an
    error (call `reset()`), as a single env has no autoreset. `reset(seed=s)` seeds the sub-env's generator and
    Gymnasium's `np_random` with `s`. Actions, validation and errors are those of `OpenSoraLiberoEnv`.

    `image_only=True` (the ids `OpenSoraLibero-*-Image-v0`) observes the image alone, (S, S, 3) uint8, with the
    task in `info["task"]`: what Stable-Baselines3 can batch.

    `gym.make(id, max_episode_steps=N)` sets the env's own limit to N actions (N / 8 chunk steps), as for
    `OpenSoraLiberoEnv`; Gymnasium still wraps its `TimeLimit` of N steps around it, which never fires first
    (`opensora_gym.single.make_time_limit` says why).
    """

    metadata: ClassVar[dict] = {"render_modes": ["rgb_array"], "render_fps": OpenSoraLiberoEnv.metadata["render_fps"]}

    def __init__(self, render_mode=None, image_only: bool = False, **kwargs):
        limit = make_time_limit(self)
        if limit is not None:
            kwargs["max_episode_steps"] = limit
        super().__init__(OpenSoraLiberoEnv(1, render_mode=render_mode, **kwargs), render_mode, image_only)

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        options = dict(options or {})
        if "episode_index" in options:
            options["episode_indices"] = [options.pop("episode_index")]
        return super().reset(seed=seed, options=options)


def _draw_seed(seed: int) -> int:
    """The seed of a sub-env's second generator (the signal's): derived from its seed, distinct from it."""
    return int(np.random.SeedSequence(seed, spawn_key=(1,)).generate_state(1, dtype=np.uint64)[0])


def _is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _check_finite(values: torch.Tensor, name: str, env_indices: list[int]) -> None:
    """Raises FloatingPointError naming the sub-envs whose `values` [n, ...] hold NaN or inf."""
    finite = torch.isfinite(values.float()).flatten(1).all(dim=1)
    if not finite.all():
        bad = [env_indices[k] for k in torch.nonzero(~finite)[:, 0].tolist()]
        raise FloatingPointError(
            f"the world model predicted NaN or inf {name} for sub-envs {bad}; no sub-env was changed (a float16 "
            "overflow? try dtype='bfloat16' or 'float32'; else check the checkpoint's weights)"
        )
