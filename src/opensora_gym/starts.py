"""Where the episodes of `OpenSoraLiberoEnv`'s sub-envs start: which recorded trajectory and frame, shared by groups.

An episode starts from a frame of a recorded trajectory (the first one unless the env's `start_frame` says
otherwise; `"random"` draws it), with the recorded frames before it as the world model's condition, or from a frame
the caller gives. A group is `group_size` consecutive sub-envs (a GRPO group) whose k-th episodes all start from the
group's k-th draw (a trajectory, and with `"random"` a frame of it), so members that end at different times still
share their starts. Draws come from one `torch.Generator` that a seeded full reset reseeds.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from opensora_gym.data import TrajectoryDataset

# `episode_index` of a sub-env started from a given image (`reset(options={"start_images": ...})`), not a trajectory.
GIVEN_START = -1
# `start_frame` that draws each start's frame uniformly from its trajectory's frames.
RANDOM_START_FRAME = "random"
_FROM_END = re.compile(r"end-(\d+)")


def check_start_frame(start_frame: int | str) -> None:
    """Raises ValueError unless `start_frame` is a frame index (int >= 0), `"end-K"` (K >= 0 frames before the
    last) or `"random"`."""
    if isinstance(start_frame, bool) or not (
        (isinstance(start_frame, int) and start_frame >= 0)
        or (isinstance(start_frame, str) and (_FROM_END.fullmatch(start_frame) or start_frame == RANDOM_START_FRAME))
    ):
        raise ValueError(
            f"start_frame must be a frame index >= 0, 'end-K' (K >= 0 frames before an episode's last frame) or "
            f"'random', got {start_frame!r}"
        )


def start_index(start_frame: int | str, num_frames: int) -> int:
    """The frame of a `num_frames`-frame trajectory that `start_frame` (checked) names: an index past the last
    frame is the last frame, `end-K` before frame 0 is frame 0."""
    if isinstance(start_frame, str):
        return max(num_frames - 1 - int(_FROM_END.fullmatch(start_frame)[1]), 0)
    return min(start_frame, num_frames - 1)


@dataclass(frozen=True)
class Start:
    """Where one sub-env's episode starts.

    Attributes:
        episode_index: the recorded trajectory it starts in, or `GIVEN_START`.
        frames: [T, H, W, 3] uint8, at the size they were recorded or given: the start frame last, the recorded
            frames before it (the world model's condition) in front; fewer than the condition frames are padded
            with the first one (a trajectory's frame 0, or a given frame, is repeated, as in the reference).
        task: the instruction of the episode.
    """

    episode_index: int
    frames: np.ndarray
    task: str

    @property
    def image(self) -> np.ndarray:
        """[H, W, 3] uint8: the start frame, the episode's first observation."""
        return self.frames[-1]

    def condition(self, count: int) -> np.ndarray:
        """[count, H, W, 3] uint8: the last `count` frames, the first one repeated in front where too few."""
        frames = self.frames[-count:]
        return np.concatenate([np.repeat(frames[:1], count - len(frames), axis=0), frames])


class StartSampler:
    """Chooses the start of each sub-env's next episode: a group's draw, a chosen trajectory or a given frame.

    Args:
        dataset: the recorded trajectories.
        num_envs: N, the number of sub-envs.
        group_size: consecutive sub-envs that share their starts; a positive divisor of `num_envs`.
        start_frame: the frame of a trajectory an episode starts from: an index (0: the first frame; past a
            trajectory's last frame: its last), `"end-K"`, K frames before its last frame (before frame 0:
            frame 0), so that every start has the same K recorded frames after it, or `"random"`: a frame drawn
            uniformly from the trajectory's frames with each draw (chosen trajectories, `episode_indices`, draw
            their frame too), so that episodes start in every phase of the recordings.
        context: frames a start carries, the start frame last (the world model's condition frames).

    Example:
        >>> sampler = StartSampler(dataset, num_envs=4, group_size=2)  # doctest: +SKIP
        >>> sampler.seed(0)  # doctest: +SKIP
        >>> starts = sampler.next_starts([0, 1, 2, 3])  # doctest: +SKIP
        >>> starts[0].episode_index == starts[1].episode_index  # doctest: +SKIP
        True
    """

    def __init__(
        self,
        dataset: TrajectoryDataset,
        num_envs: int,
        group_size: int = 1,
        start_frame: int | str = 0,
        context: int = 1,
    ):
        if group_size < 1 or num_envs % group_size:
            raise ValueError(f"group_size must be a positive divisor of num_envs ({num_envs}), got {group_size!r}")
        check_start_frame(start_frame)
        if not isinstance(context, int) or context < 1:
            raise ValueError(f"context must be a positive integer, got {context!r}")
        self.dataset = dataset
        self.start_frame = start_frame
        self.context = context
        self.num_envs = num_envs
        self.group_size = group_size
        self.generator = torch.Generator()
        self._group_draws: list[list[tuple[int, int | None]]] = [[] for _ in range(num_envs // group_size)]
        self._episodes_started = np.zeros(num_envs, dtype=np.int64)
        self._starts: dict[int, tuple[np.ndarray, str]] = {}
        self._lengths: dict[int, int] = {}  # frames of the trajectories read so far ("random")

    def seed(self, seed: int) -> None:
        """Reseeds the draws and starts every group's sequence of draws over (what a seeded full reset does)."""
        self.generator.manual_seed(seed)
        self._group_draws = [[] for _ in self._group_draws]
        self._episodes_started[:] = 0

    def check_options(self, options: Mapping[str, Any]) -> tuple[list[int] | None, list[Start] | None]:
        """The starts a reset's options choose, checked: `episode_indices`, or `start_images` with `start_tasks`.

        Args:
            options: the reset options; `episode_indices` [N] ints in [0, len(dataset)), `start_images`
                [N, H, W, 3] uint8 and `start_tasks` N non-empty instructions. Other keys are ignored.

        Returns:
            (episodes, given): the chosen trajectory of each of the N sub-envs, or None; the given start of each,
            or None. At most one of the two is not None.
        """
        episodes = options.get("episode_indices")
        if episodes is not None:
            episodes = self._check_episode_indices(episodes)
        if "start_images" not in options and "start_tasks" not in options:
            return episodes, None
        if "start_images" not in options or "start_tasks" not in options:
            raise ValueError("reset options start_images and start_tasks come together: give both or neither")
        if episodes is not None:
            raise ValueError("reset options episode_indices and start_images both choose the starts: give one")
        images, tasks = options["start_images"], options["start_tasks"]
        n = self.num_envs
        if not isinstance(images, np.ndarray) or images.dtype != np.uint8:
            kind = images.dtype if isinstance(images, np.ndarray) else type(images).__name__
            raise TypeError(f"start_images must be a uint8 numpy array [{n}, H, W, 3], got {kind}")
        if images.ndim != 4 or images.shape[0] != n or images.shape[-1] != 3 or 0 in images.shape:
            raise ValueError(f"start_images must have shape ({n}, H, W, 3), got {images.shape}")
        if isinstance(tasks, str) or not isinstance(tasks, (Sequence, np.ndarray)) or len(tasks) != n:
            raise ValueError(f"start_tasks must be {n} instructions (one per sub-env), got {tasks!r}")
        if not all(isinstance(task, str) and task for task in tasks):
            raise TypeError(f"start_tasks must be non-empty strings, got {[type(t).__name__ for t in tasks]}")
        return None, [Start(GIVEN_START, images[i, None], str(tasks[i])) for i in range(n)]

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

    def next_starts(
        self, env_indices: Sequence[int], episodes: list[int] | None = None, given: list[Start] | None = None
    ) -> list[Start]:
        """The starts of the next episodes of the sub-envs `env_indices`.

        Args:
            env_indices: the sub-envs that start an episode; their groups draw in this order.
            episodes: [N] the trajectory of each sub-env (from `check_options`), else None.
            given: [N] the given start of each sub-env (from `check_options`), else None. Given starts and chosen
                trajectories take no draw of a trajectory (with `"random"`, a chosen trajectory draws its frame).

        Returns:
            One `Start` per sub-env of `env_indices`: its `given` start, else its chosen trajectory's, else its
            group's next draw.
        """
        if given is not None:
            return [given[i] for i in env_indices]
        if episodes is None:
            chosen = [self._next_group_draw(i) for i in env_indices]
        else:
            chosen = [(episodes[i], self._draw_frame(episodes[i])) for i in env_indices]
        return [Start(e, *self._start_frames(e, frame)) for e, frame in chosen]

    def _next_group_draw(self, env_index: int) -> tuple[int, int | None]:
        """The k-th episode of sub-env `env_index` starts from its group's k-th draw: (trajectory, frame or None)."""
        group = env_index // self.group_size
        k = self._episodes_started[env_index]
        drawn = self._group_draws[group]
        while len(drawn) <= k:
            episode = int(torch.randint(len(self.dataset), (1,), generator=self.generator))
            drawn.append((episode, self._draw_frame(episode)))
        self._episodes_started[env_index] += 1
        return drawn[k]

    def _draw_frame(self, episode: int) -> int | None:
        """With `"random"`, a frame index of `episode` drawn uniformly; otherwise None (`start_frame` names it)."""
        if self.start_frame != RANDOM_START_FRAME:
            return None
        if episode not in self._lengths:
            self._lengths[episode] = len(self.dataset.images(episode)[0])
        return int(torch.randint(self._lengths[episode], (1,), generator=self.generator))

    def _start_frames(self, episode: int, frame: int | None) -> tuple[np.ndarray, str]:
        if frame is not None:  # a drawn frame: read for this start only (a trajectory has as many starts as frames)
            images, task = self.dataset.images(episode)
            return images[max(frame + 1 - self.context, 0) : frame + 1], task
        # Trajectory files hold every frame of an episode: read each once and keep only the start's frames.
        if episode not in self._starts:
            images, task = self.dataset.images(episode)
            last = start_index(self.start_frame, len(images))
            self._starts[episode] = images[max(last + 1 - self.context, 0) : last + 1], task
        return self._starts[episode]
