"""`RecordEpisodeVideo`: one annotated mp4 per imagined episode of a vectorized world-model env.

Every frame the world model predicts is written (all `action_chunk` frames of a chunk, not only the observed
last one), with the task instruction and the step number drawn in a dark band at the bottom of the frame.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import imageio.v2 as imageio
import numpy as np
from gymnasium.vector import AutoresetMode, VectorEnv, VectorWrapper
from PIL import Image, ImageDraw, ImageFont

# Frames smaller than this are enlarged (by an integer factor, nearest neighbour) before the text is drawn, so
# that the text stays legible on 64 px frames.
DEFAULT_MIN_VIDEO_SIZE = 256
TASK_LINES = 2


@lru_cache(maxsize=8)
def _font(size: int) -> ImageFont.FreeTypeFont:
    # Pillow's bundled scalable font: no system font needed.
    return ImageFont.load_default(size=size)


def _wrap(text: str, font: ImageFont.FreeTypeFont, width: float, max_lines: int) -> list[str]:
    """Greedy word wrap of `text` to `width` pixels; the last line ends with '...' when text is left over."""
    words = text.split()
    lines: list[str] = []
    while words and len(lines) < max_lines:
        line = words.pop(0)
        while words and font.getlength(f"{line} {words[0]}") <= width:
            line = f"{line} {words.pop(0)}"
        lines.append(line)
    if words or (lines and font.getlength(lines[-1]) > width):
        last = lines[-1]
        while last and font.getlength(f"{last}...") > width:
            last = last[:-1]
        lines[-1] = f"{last.rstrip()}..."
    return lines


def annotate_frame(frame: np.ndarray, task: str, step: int, min_size: int = DEFAULT_MIN_VIDEO_SIZE) -> np.ndarray:
    """Draws the step number and the task instruction on a frame.

    Args:
        frame: [H, W, 3] uint8.
        task: the instruction; wrapped on up to two lines and cut with '...' when longer.
        step: actions taken in the episode when the frame was seen.
        min_size: frames whose height is below this are enlarged by the smallest integer factor that reaches it.

    Returns:
        [H * k, W * k, 3] uint8, k the enlargement factor (1 for frames of at least `min_size`).
    """
    if frame.ndim != 3 or frame.shape[-1] != 3 or frame.dtype != np.uint8:
        raise ValueError(f"frame must be [H, W, 3] uint8, got shape {frame.shape} of {frame.dtype}")
    scale = max(1, math.ceil(min_size / frame.shape[0]))
    if scale > 1:
        frame = np.repeat(np.repeat(frame, scale, axis=0), scale, axis=1)  # [H * k, W * k, 3]
    height, width = frame.shape[:2]
    font_size = max(8, height // 20)
    font = _font(font_size)
    margin = max(2, font_size // 4)
    lines = [f"step {step}", *_wrap(task, font, width - 2 * margin, TASK_LINES)]
    line_height = font_size + margin
    band = min(height, len(lines) * line_height + margin)
    out = frame.copy()
    # A dark, slightly see-through band: white text stays readable on any scene.
    out[height - band :] = (out[height - band :].astype(np.float32) * 0.25).astype(np.uint8)
    image = Image.fromarray(out)
    draw = ImageDraw.Draw(image)
    for k, line in enumerate(lines):
        draw.text((margin, height - band + margin // 2 + k * line_height), line, font=font, fill=(255, 255, 255))
    return np.asarray(image)


@dataclass
class _Recording:
    """An episode being written: its writer and what is drawn on its frames."""

    path: Path
    writer: Any
    task: str
    frames: int = 0


class RecordEpisodeVideo(VectorWrapper):
    """Writes each sub-env's episodes to their own annotated mp4 files.

    The wrapper turns on `return_frames` of the unwrapped env, so a chunk step writes its `action_chunk`
    predicted frames; an episode's video is its start frame followed by every predicted frame. A sub-env whose
    step infos are masked has just been reset by the env's next-step autoreset: its new episode starts with the
    observation of that step. A video file is complete when its episode ends, when `reset()` starts new episodes,
    or on `close()` (unfinished episodes are written up to where they are; an episode that has only its start frame,
    not a single imagined chunk, is dropped and leaves no file).

    Files are named `{name_prefix}-env{i}-episode{e}.mp4`: `i` the sub-env, `e` the episode id, which counts the
    episodes started in all sub-envs (in order of start, then sub-env index) from 0.

    Args:
        env: a next-step autoreset vector env whose unwrapped env has a `return_frames` switch and whose infos
            hold `frames` [N, A, H, W, 3] uint8 (`OpenSoraLiberoEnv`).
        video_folder: where the mp4 files go (created if needed).
        episode_trigger: `episode_trigger(episode_id) -> bool` chooses the episodes to record; default all.
        name_prefix: start of every file name.
        fps: frames per second of the videos.
        min_video_size: smaller frames are enlarged by an integer factor (nearest neighbour) to at least this
            height, to keep the text legible.

    Attributes:
        video_paths: the files written so far, in order of completion.
    """

    def __init__(
        self,
        env: VectorEnv,
        video_folder: str | Path,
        episode_trigger: Callable[[int], bool] | None = None,
        name_prefix: str = "episode",
        fps: int = 10,
        min_video_size: int = DEFAULT_MIN_VIDEO_SIZE,
    ):
        super().__init__(env)
        if env.metadata.get("autoreset_mode") != AutoresetMode.NEXT_STEP:
            raise ValueError(
                f"RecordEpisodeVideo needs a next-step autoreset env, got autoreset_mode "
                f"{env.metadata.get('autoreset_mode')!r}"
            )
        if not hasattr(env.unwrapped, "return_frames"):
            raise ValueError(
                f"RecordEpisodeVideo needs an env with a `return_frames` switch (OpenSoraLiberoEnv), "
                f"got {type(env.unwrapped).__name__}"
            )
        if fps < 1 or min_video_size < 1:
            raise ValueError(f"fps and min_video_size must be positive, got fps={fps}, min_video_size={min_video_size}")
        self.video_folder = Path(video_folder)
        self.video_folder.mkdir(parents=True, exist_ok=True)
        self.episode_trigger = episode_trigger or (lambda episode_id: True)
        self.name_prefix = name_prefix
        self.fps = fps
        self.min_video_size = min_video_size
        self.video_paths: list[Path] = []
        self._next_episode_id = 0
        self._recordings: list[_Recording | None] = [None] * env.num_envs
        self._return_frames_before = env.unwrapped.return_frames
        env.unwrapped.return_frames = True

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        """Resets the env; episodes being recorded are written as they are and every sub-env starts a new one."""
        obs, info = self.env.reset(seed=seed, options=options)
        self._finish_all()
        for i in range(self.num_envs):
            self._start(i, obs["image"][i], obs["task"][i])
        return obs, info

    def step(self, actions):
        """Steps the env and appends the chunk's frames of every recorded sub-env to its video."""
        obs, reward, terminated, truncated, info = self.env.step(actions)
        if "frames" not in info:
            raise RuntimeError(
                "the env returned no info['frames']: RecordEpisodeVideo needs return_frames=True on the unwrapped "
                "env (it sets it at construction; do not turn it off)"
            )
        stepped = info["_frames"]
        for i in range(self.num_envs):
            if not stepped[i]:
                self._finish(i)
                self._start(i, obs["image"][i], obs["task"][i])
                continue
            recording = self._recordings[i]
            if recording is not None:
                chunk = info["frames"][i]  # [A, H, W, 3]
                if "frame_executed" in info:  # the real simulator stops a chunk at success
                    chunk = chunk[info["frame_executed"][i]]
                first_step = int(info["episode_length"][i]) - len(chunk) + 1
                for k, frame in enumerate(chunk):
                    self._write(recording, frame, first_step + k)
            if terminated[i] or truncated[i]:
                self._finish(i)
        return obs, reward, terminated, truncated, info

    def stop(self) -> None:
        """Writes the episodes still being recorded and leaves the env as it found it (its `return_frames` switch
        restored), without closing it: the env can go on unwrapped."""
        self._finish_all()
        self.env.unwrapped.return_frames = self._return_frames_before

    def close(self, **kwargs: Any) -> None:
        """Writes the episodes still being recorded, then closes the env."""
        self.stop()
        super().close(**kwargs)

    def _start(self, index: int, image: np.ndarray, task: str) -> None:
        episode_id = self._next_episode_id
        self._next_episode_id += 1
        if not self.episode_trigger(episode_id):
            return
        path = self.video_folder / f"{self.name_prefix}-env{index}-episode{episode_id}.mp4"
        writer = imageio.get_writer(path, fps=self.fps, codec="libx264", macro_block_size=1)
        self._recordings[index] = recording = _Recording(path=path, writer=writer, task=str(task))
        self._write(recording, image, 0)

    def _write(self, recording: _Recording, frame: np.ndarray, step: int) -> None:
        recording.writer.append_data(annotate_frame(frame, recording.task, step, self.min_video_size))
        recording.frames += 1

    def _finish(self, index: int) -> None:
        recording = self._recordings[index]
        if recording is None:
            return
        recording.writer.close()
        self._recordings[index] = None
        if recording.frames == 1:  # only the start frame: nothing was imagined in this episode
            recording.path.unlink()
            return
        self.video_paths.append(recording.path)

    def _finish_all(self) -> None:
        for i in range(len(self._recordings)):
            self._finish(i)
