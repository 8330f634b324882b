"""Fidelity audit: the world model against the real LIBERO simulator, from the same initial states.

RL in a world model is only as good as the world model: where it imagines success that the simulator would not
give, a policy learns to exploit it. The audit measures that for any checkpoint. For each LIBERO initial state
(task id, trial id), the simulator resets; the frame it renders, resized to the world model's image size as the
dataset's start frames are (same orientation: the LIBERO env's), starts the world-model env
(`reset(options={"start_images": ...})`). Then:

1. open loop: both get the same action chunks (a policy acting on the simulator's observation, or recorded
   actions). Per chunk: PSNR and SSIM of the world model's frames against the simulator's (resized to the world
   model's size; only the frames the simulator executed: it stops a chunk at success), the reward model's success
   label (the world-model env's termination rule) against the simulator's success flag, and the first chunk whose
   PSNR falls below `divergence_psnr`. The comparison of a start ends with the simulator's episode; the world
   model goes on past its own imagined success so that the two stay comparable.
2. closed loop: the policy runs in each env from the same starts until the episode ends (the simulator's
   episode of the open loop is reused when the policy chose its actions). Per episode: success in each; over
   episodes: agreement, false-success rate (success in the world model among the episodes the simulator failed)
   and missed-success rate (failure in the world model among the simulator's successes), with 95% Wilson
   intervals.
3. replay (against the simulator only): the simulator executes the actions the policy chose in the world model,
   up to the world model's episode end. It tells the two ways an imagined success can be false apart: the replay
   succeeds too (the world model's dynamics were right about those actions; the policy acts differently on the
   simulator's frames) or it fails (the world model imagined what the actions do not achieve).

The same functions audit an approximate speed mode (fewer sampling steps) against exact mode: pass the exact
world-model env as `reference_env`; it then stands where the simulator stood (the simulator still renders the
start frames).

    >>> report = audit_world_model(simulator, world_model_env, [(0, 0), (0, 1)], act)  # doctest: +SKIP
    >>> report.save("runs/audit")  # audit.json, audit.md  # doctest: +SKIP
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import imageio.v2 as imageio
import numpy as np
import torch
import torch.nn.functional as F
from gymnasium.vector import VectorEnv

from opensora_gym.convert import resize_images
from opensora_gym.env import OpenSoraLiberoEnv
from opensora_gym.intervals import wilson_rate
from opensora_gym.wrappers.video import annotate_frame

__all__ = [
    "MAX_PSNR",
    "AuditReport",
    "ChunkComparison",
    "ClosedLoopEpisode",
    "OpenLoopEpisode",
    "SuccessAgreement",
    "audit_world_model",
    "psnr",
    "side_by_side",
    "ssim",
    "success_agreement",
    "to_world_model_frames",
]

# PSNR of identical frames: a finite stand-in for infinity, so means and JSON stay finite.
MAX_PSNR = 100.0
# SSIM as Wang et al. (2004) define it: an 11 x 11 Gaussian window of std 1.5, K1 = 0.01, K2 = 0.03.
SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
SSIM_K1 = 0.01
SSIM_K2 = 0.03

Act = Callable[[dict[str, Any]], Any]


# ------------------------------------------------------------------------------------------------ metrics


def psnr(reference: np.ndarray, predicted: np.ndarray, data_range: float = 255.0) -> np.ndarray:
    """Peak signal-to-noise ratio per image, in dB, capped at `MAX_PSNR` (identical images).

    Args:
        reference, predicted: ``[..., H, W, C]`` images of one shape (uint8 or float in [0, data_range]).
        data_range: the largest possible pixel value.

    Returns:
        ``[...]`` float64.
    """
    reference, predicted = _same_shape(reference, predicted)
    mse = ((reference - predicted) ** 2).mean(axis=(-3, -2, -1))
    floor = data_range**2 * 10.0 ** (-MAX_PSNR / 10.0)
    return 10.0 * np.log10(data_range**2 / np.maximum(mse, floor))


def ssim(reference: np.ndarray, predicted: np.ndarray, data_range: float = 255.0) -> np.ndarray:
    """Structural similarity per image: per channel over every full 11 x 11 Gaussian window, then the mean.

    Means, variances and the covariance are Gaussian-weighted (std 1.5) over windows that lie inside the image
    (no padding), with ``C1 = (0.01 L)^2`` and ``C2 = (0.03 L)^2``; the SSIM map is averaged over positions and
    channels.

    Args:
        reference, predicted: ``[..., H, W, C]`` images of one shape, H and W at least 11.
        data_range: L, the largest possible pixel value.

    Returns:
        ``[...]`` float64 in [-1, 1]; 1 for identical images.
    """
    reference, predicted = _same_shape(reference, predicted)
    *batch, height, width, channels = reference.shape
    if height < SSIM_WINDOW or width < SSIM_WINDOW:
        raise ValueError(f"ssim needs images of at least {SSIM_WINDOW} x {SSIM_WINDOW} pixels, got {height} x {width}")
    x = torch.from_numpy(reference).reshape(-1, height, width, channels).permute(0, 3, 1, 2)  # [B, C, H, W]
    y = torch.from_numpy(predicted).reshape(-1, height, width, channels).permute(0, 3, 1, 2)
    x, y = x.reshape(-1, 1, height, width), y.reshape(-1, 1, height, width)  # [B * C, 1, H, W]
    offsets = torch.arange(SSIM_WINDOW, dtype=torch.float64) - (SSIM_WINDOW - 1) / 2
    line = torch.exp(-(offsets**2) / (2 * SSIM_SIGMA**2))
    line = line / line.sum()
    window = (line[:, None] * line[None, :])[None, None]  # [1, 1, 11, 11]

    def blur(z: torch.Tensor) -> torch.Tensor:
        return F.conv2d(z, window)  # [B * C, 1, H - 10, W - 10]

    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x**2
    var_y = blur(y * y) - mu_y**2
    cov = blur(x * y) - mu_x * mu_y
    c1, c2 = (SSIM_K1 * data_range) ** 2, (SSIM_K2 * data_range) ** 2
    index = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    per_channel = index.mean(dim=(1, 2, 3)).reshape(-1, channels)  # [B, C]
    return per_channel.mean(dim=1).reshape(batch).numpy()


def _same_shape(reference: np.ndarray, predicted: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    reference, predicted = np.asarray(reference, np.float64), np.asarray(predicted, np.float64)
    if reference.shape != predicted.shape or reference.ndim < 3:
        raise ValueError(f"images must have one shape [..., H, W, C], got {reference.shape} and {predicted.shape}")
    return reference, predicted


@dataclass(frozen=True)
class SuccessAgreement:
    """How the world model's success labels agree with the simulator's over paired episodes (or chunks).

    Attributes:
        both_success: success in both.
        both_failure: failure in both.
        false_success: success in the world model, failure in the simulator (what a policy can exploit).
        missed_success: failure in the world model, success in the simulator.
    """

    both_success: int
    both_failure: int
    false_success: int
    missed_success: int

    @property
    def episodes(self) -> int:
        return self.both_success + self.both_failure + self.false_success + self.missed_success

    def rates(self) -> dict[str, dict[str, float] | None]:
        """`{name: {"rate", "ci_low", "ci_high", "count", "of"}}` (95% Wilson); None where nothing was counted.

        `agreement` is over all pairs; `false_success_rate` over the simulator's failures; `missed_success_rate`
        over the simulator's successes; `world_model_success` and `simulator_success` over all pairs.
        """
        simulator_failures = self.both_failure + self.false_success
        simulator_successes = self.both_success + self.missed_success
        return {
            "agreement": wilson_rate(self.both_success + self.both_failure, self.episodes),
            "false_success_rate": wilson_rate(self.false_success, simulator_failures),
            "missed_success_rate": wilson_rate(self.missed_success, simulator_successes),
            "world_model_success": wilson_rate(self.both_success + self.false_success, self.episodes),
            "simulator_success": wilson_rate(simulator_successes, self.episodes),
        }

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "episodes": self.episodes, **self.rates()}


def success_agreement(world_model: Sequence[bool], simulator: Sequence[bool]) -> SuccessAgreement:
    """Counts the four outcomes of paired success labels.

    Args:
        world_model: ``[E]`` the world model's success per episode (or chunk).
        simulator: ``[E]`` the simulator's success of the same episodes.
    """
    world_model, simulator = np.asarray(world_model, dtype=bool), np.asarray(simulator, dtype=bool)
    if world_model.shape != simulator.shape or world_model.ndim != 1:
        raise ValueError(f"need two label sequences [E] of one length, got {world_model.shape} and {simulator.shape}")
    return SuccessAgreement(
        both_success=int((world_model & simulator).sum()),
        both_failure=int((~world_model & ~simulator).sum()),
        false_success=int((world_model & ~simulator).sum()),
        missed_success=int((~world_model & simulator).sum()),
    )


# ------------------------------------------------------------------------------------------------ frames


def to_world_model_frames(frames: np.ndarray, image_size: int) -> np.ndarray:
    """Simulator frames as the world model's dataset stores frames: the LIBERO env's orientation (which the
    simulator already returns), resized to the world model's size with the converter's resize.

    Args:
        frames: ``[..., H, W, 3]`` uint8.
        image_size: S, the world model's frame side.

    Returns:
        ``[..., S, S, 3]`` uint8.
    """
    frames = np.asarray(frames)
    if frames.ndim < 3 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"frames must be uint8 [..., H, W, 3], got {frames.dtype} of shape {frames.shape}")
    flat = frames.reshape(-1, *frames.shape[-3:])  # [B, H, W, 3]
    return resize_images(flat, image_size).reshape(*frames.shape[:-3], image_size, image_size, 3)


def side_by_side(simulator: np.ndarray, world_model: np.ndarray) -> np.ndarray:
    """One video frame: simulator | world model | absolute difference, ``[S, S, 3]`` each -> ``[S, 3 S, 3]`` uint8."""
    difference = np.abs(simulator.astype(np.int16) - world_model.astype(np.int16)).astype(np.uint8)
    return np.concatenate([simulator, world_model, difference], axis=1)


# ------------------------------------------------------------------------------------------------ results


@dataclass(frozen=True)
class ChunkComparison:
    """One open-loop chunk of one start.

    Attributes:
        chunk: its index in the episode.
        frames: frames compared (the simulator's executed actions of the chunk).
        psnr: mean PSNR of those frames, dB.
        ssim: mean SSIM of those frames.
        world_model_success: the world-model env's success rule fired on this chunk (the reward model's label).
        simulator_success: LIBERO's success check passed during this chunk.
        max_success_prob: the reward model's largest probability over the chunk's frames.
    """

    chunk: int
    frames: int
    psnr: float
    ssim: float
    world_model_success: bool
    simulator_success: bool
    max_success_prob: float


@dataclass(frozen=True)
class OpenLoopEpisode:
    """The open-loop comparison from one initial state.

    Attributes:
        task_id, trial_id: the LIBERO initial state.
        task: its instruction.
        chunks: one comparison per chunk, until the simulator's episode ended.
        first_divergence: the first chunk whose PSNR is below the audit's `divergence_psnr`, or None.
        video: the side-by-side mp4, or None.
    """

    task_id: int
    trial_id: int
    task: str
    chunks: list[ChunkComparison]
    first_divergence: int | None
    video: str | None = None


@dataclass(frozen=True)
class ClosedLoopEpisode:
    """The policy run in each env from one initial state.

    Attributes:
        task_id, trial_id, task: the LIBERO initial state and its instruction.
        simulator_success, world_model_success: whether the episode succeeded in each.
        simulator_length, world_model_length: actions taken in each.
        video: the mp4 of the policy's episode in the world model (its own frames: the policy sees them), or None.
            The simulator's episode of the policy is the left panel of the open-loop video when the policy chose
            the open-loop actions.
        replay_success: whether the simulator succeeds when it executes the actions the policy chose in the
            world model (up to the world model's episode end), or None (audited against another world model). A
            world-model success that its replay confirms is a true success of those actions: when the policy still
            fails in the simulator, the world model misleads it through what it sees (its frames), not through
            what its actions do. A success the replay does not confirm is a lie of the world model's dynamics.
    """

    task_id: int
    trial_id: int
    task: str
    simulator_success: bool
    world_model_success: bool
    simulator_length: int
    world_model_length: int
    video: str | None = None
    replay_success: bool | None = None


@dataclass
class AuditReport:
    """Everything an audit measured. With `reference_env`, "simulator" fields hold that reference's numbers
    (`settings["reference"]` names it).

    Attributes:
        settings: what was audited and how (reference, starts, seed, thresholds, sampling steps, action source).
        open_loop: one entry per start.
        closed_loop: one entry per start (empty when the audit ran without a policy).
    """

    settings: dict[str, Any]
    open_loop: list[OpenLoopEpisode] = field(default_factory=list)
    closed_loop: list[ClosedLoopEpisode] = field(default_factory=list)

    def chunk_agreement(self) -> SuccessAgreement:
        """The reward model's label against the simulator's flag over every open-loop chunk."""
        chunks = [c for e in self.open_loop for c in e.chunks]
        return success_agreement([c.world_model_success for c in chunks], [c.simulator_success for c in chunks])

    def episode_agreement(self) -> SuccessAgreement:
        """Closed-loop success in the world model against the simulator, per start."""
        return success_agreement(
            [e.world_model_success for e in self.closed_loop], [e.simulator_success for e in self.closed_loop]
        )

    def replay_agreement(self) -> SuccessAgreement:
        """Closed-loop success in the world model against the simulator's replay of the same actions, per start
        (the starts with a replay)."""
        replayed = [e for e in self.closed_loop if e.replay_success is not None]
        return success_agreement([e.world_model_success for e in replayed], [e.replay_success for e in replayed])

    def summary(self) -> dict[str, float]:
        """The headline numbers as flat `open_loop/...` and `closed_loop/...` keys (those that could be counted)."""
        out: dict[str, float] = {}
        chunks = [c for e in self.open_loop for c in e.chunks]
        if chunks:
            diverged = [e.first_divergence for e in self.open_loop if e.first_divergence is not None]
            out.update(
                {
                    "open_loop/chunks": float(len(chunks)),
                    "open_loop/psnr": float(np.mean([c.psnr for c in chunks])),
                    "open_loop/ssim": float(np.mean([c.ssim for c in chunks])),
                    "open_loop/diverged_fraction": len(diverged) / len(self.open_loop),
                }
            )
            if diverged:
                out["open_loop/first_divergence_chunk"] = float(np.mean(diverged))
            out.update(_flat_rates("open_loop/label_", self.chunk_agreement()))
        if self.closed_loop:
            out["closed_loop/episodes"] = float(len(self.closed_loop))
            out.update(_flat_rates("closed_loop/", self.episode_agreement()))
            if any(e.replay_success is not None for e in self.closed_loop):
                out.update(_flat_rates("closed_loop/replay_", self.replay_agreement()))
        return out

    def to_dict(self) -> dict[str, Any]:
        """Plain data for JSON: settings, summary, both agreements and every episode."""
        return {
            "settings": self.settings,
            "summary": self.summary(),
            "open_loop_label_agreement": self.chunk_agreement().to_dict() if self.open_loop else None,
            "closed_loop_agreement": self.episode_agreement().to_dict() if self.closed_loop else None,
            "replay_agreement": self.replay_agreement().to_dict() if self.closed_loop else None,
            "open_loop": [asdict(e) for e in self.open_loop],
            "closed_loop": [asdict(e) for e in self.closed_loop],
        }

    def markdown(self) -> str:
        """A short report: settings, the closed-loop agreement, and one open-loop line per start."""
        settings = self.settings
        lines = [
            "# World-model fidelity audit",
            "",
            f"Reference: {settings.get('reference')}; world model: {settings.get('world_model')}; "
            f"{len(self.open_loop)} starts; actions (open loop): {settings.get('actions')}; "
            f"divergence below {settings.get('divergence_psnr')} dB PSNR.",
        ]
        if self.closed_loop:
            lines += ["", "## Closed loop (the policy in each env)", "", "| measure | rate | 95% CI | count |"]
            lines.append("|---|---|---|---|")
            for name, rate in self.episode_agreement().rates().items():
                lines.append(_markdown_rate(name, rate))
            replay = self.replay_agreement()
            if replay.episodes:
                lines += ["", "## Replay (the policy's world-model actions executed in the simulator)", ""]
                lines.append(
                    f"The simulator confirms {replay.both_success} of the world model's "
                    f"{replay.both_success + replay.false_success} imagined successes (false successes of the "
                    "dynamics: the rest); the policy itself succeeds in the simulator "
                    f"{sum(e.simulator_success for e in self.closed_loop)} times."
                )
                lines += ["", "| measure | rate | 95% CI | count |", "|---|---|---|---|"]
                lines += [_markdown_rate(name, rate) for name, rate in replay.rates().items()]
        if self.open_loop:
            lines += ["", "## Open loop (the same actions in both)", ""]
            lines += ["| task | trial | chunks | PSNR (dB) | SSIM | label agreement | first divergence |"]
            lines.append("|---|---|---|---|---|---|---|")
            for e in self.open_loop:
                agree = sum(c.world_model_success == c.simulator_success for c in e.chunks)
                psnr_mean = np.mean([c.psnr for c in e.chunks]) if e.chunks else float("nan")
                ssim_mean = np.mean([c.ssim for c in e.chunks]) if e.chunks else float("nan")
                divergence = "none" if e.first_divergence is None else f"chunk {e.first_divergence}"
                lines.append(
                    f"| {e.task_id} | {e.trial_id} | {len(e.chunks)} | {psnr_mean:.2f} | {ssim_mean:.3f} | "
                    f"{agree}/{len(e.chunks)} | {divergence} |"
                )
            lines += ["", "Chunk labels (reward model vs simulator):", "", "| measure | rate | 95% CI | count |"]
            lines.append("|---|---|---|---|")
            for name, rate in self.chunk_agreement().rates().items():
                lines.append(_markdown_rate(name, rate))
        return "\n".join(lines) + "\n"

    def save(self, folder: str | Path) -> tuple[Path, Path]:
        """Writes `audit.json` and `audit.md` into `folder` (created); returns their paths."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        json_path, markdown_path = folder / "audit.json", folder / "audit.md"
        json_path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        markdown_path.write_text(self.markdown())
        return json_path, markdown_path


def _flat_rates(prefix: str, agreement: SuccessAgreement) -> dict[str, float]:
    out = {}
    for name, rate in agreement.rates().items():
        if rate is not None:
            out.update({f"{prefix}{name}": rate["rate"], f"{prefix}{name}_ci_low": rate["ci_low"]})
            out[f"{prefix}{name}_ci_high"] = rate["ci_high"]
    return out


def _markdown_rate(name: str, rate: dict[str, float] | None) -> str:
    if rate is None:
        return f"| {name} | - | - | 0 of 0 |"
    return (
        f"| {name} | {rate['rate']:.1%} | [{rate['ci_low']:.1%}, {rate['ci_high']:.1%}] | "
        f"{rate['count']} of {rate['of']} |"
    )


# ------------------------------------------------------------------------------------------------ the audit


def audit_world_model(
    simulator: VectorEnv,
    world_model_env: OpenSoraLiberoEnv,
    starts: Sequence[tuple[int, int]],
    act: Act | None = None,
    *,
    recorded_actions: Sequence[np.ndarray] | None = None,
    reference_env: OpenSoraLiberoEnv | None = None,
    max_chunks: int | None = None,
    seed: int = 0,
    divergence_psnr: float = 20.0,
    video_folder: str | Path | None = None,
) -> AuditReport:
    """Audits `world_model_env` against the simulator (or `reference_env`) from the LIBERO initial states `starts`.

    Starts run in waves of `num_envs` (every env must have the same number of sub-envs; a last, partial wave fills
    its spare sub-envs with its first start and ignores them).

    Args:
        simulator: the LIBERO vector env (`opensora_gym.libero.LiberoVectorEnv`); its `return_frames` is turned on.
        world_model_env: the audited world-model env; its `max_episode_steps` must cover `max_chunks` chunks.
        starts: LIBERO initial states as (task_id, trial_id).
        act: the policy, `act(observation) -> [N, action_chunk, 7]` actions in robot units; it chooses the
            open-loop actions from the reference's observation (unless `recorded_actions` is given) and runs the
            closed loop. None: open loop only, with `recorded_actions`.
        recorded_actions: one ``[T, 7]`` array of robot-unit actions per start (e.g. a dataset trajectory through
            `opensora_gym.spaces.policy_actions`), T at least `max_chunks * action_chunk`, replayed open loop.
        reference_env: a second world-model env (e.g. exact mode) to audit against instead of the simulator; the
            simulator then only renders the start frames.
        max_chunks: chunks per episode; None: the reference's episode limit in whole chunks.
        seed: the reset seed of every env (LIBERO's scene seed, the world models' noise).
        divergence_psnr: a chunk whose PSNR is below this many dB counts as diverged.
        video_folder: write here, per start, the open loop side by side (simulator | world model | difference,
            `open_loop-task{T}-trial{K}.mp4`) and, with `act`, the policy's closed-loop episode in the world model
            as the policy saw it (`closed_loop-task{T}-trial{K}.mp4`).

    Returns:
        the report, open loop and (with `act`) closed loop, with its replay in the simulator when there is no
        `reference_env`.
    """
    if act is None and recorded_actions is None:
        raise ValueError("give the policy (act) or recorded_actions: the open loop needs actions")
    if reference_env is world_model_env:
        raise ValueError("reference_env and world_model_env must be two different env objects (they may share a model)")
    starts = [(int(task), int(trial)) for task, trial in starts]
    if not starts:
        raise ValueError("starts must list at least one (task_id, trial_id)")
    n = world_model_env.num_envs
    envs = [simulator, world_model_env] + ([reference_env] if reference_env is not None else [])
    if any(env.num_envs != n for env in envs):
        raise ValueError(f"every env must have the same num_envs, got {[env.num_envs for env in envs]}")
    chunk = world_model_env.config.action_chunk
    reference = reference_env if reference_env is not None else simulator
    limit = (
        reference.config.max_episode_steps if reference_env is not None else simulator.unwrapped.config.episode_limit
    )
    max_chunks = max_chunks or math.ceil(limit / chunk)
    if world_model_env.config.max_episode_steps < max_chunks * chunk:
        raise ValueError(
            f"world_model_env.config.max_episode_steps must cover {max_chunks} chunks ({max_chunks * chunk} "
            f"actions), got {world_model_env.config.max_episode_steps}"
        )
    if recorded_actions is not None:
        recorded_actions = [np.asarray(a, dtype=np.float32) for a in recorded_actions]
        short = [i for i, a in enumerate(recorded_actions) if a.ndim != 2 or len(a) < max_chunks * chunk]
        if len(recorded_actions) != len(starts) or short:
            raise ValueError(
                f"recorded_actions must hold one [T >= {max_chunks * chunk}, 7] array per start ({len(starts)}), "
                f"got {len(recorded_actions)} arrays, too short or not 2-D: {short}"
            )
    simulator.unwrapped.return_frames = True
    world_model_env.return_frames = True
    if reference_env is not None:
        reference_env.return_frames = True
    audit = _Audit(simulator, world_model_env, reference_env, max_chunks, seed, divergence_psnr, video_folder)
    report = AuditReport(
        settings={
            "reference": "LIBERO simulator" if reference_env is None else _describe(reference_env),
            "world_model": _describe(world_model_env),
            "starts": [list(s) for s in starts],
            "seed": seed,
            "max_chunks": max_chunks,
            "action_chunk": chunk,
            "divergence_psnr": divergence_psnr,
            "actions": "policy" if recorded_actions is None else "recorded",
        }
    )
    for begin in range(0, len(starts), n):
        wave = starts[begin : begin + n]
        padded = wave + [wave[0]] * (n - len(wave))
        recorded = None
        if recorded_actions is not None:
            chosen = recorded_actions[begin : begin + n]
            recorded = np.stack([a[: max_chunks * chunk] for a in chosen + [chosen[0]] * (n - len(wave))])
        starts_of_wave = audit.starts(padded)
        open_loop, reference_outcome = audit.open_loop(padded, starts_of_wave, act, recorded)
        report.open_loop += open_loop[: len(wave)]
        if act is not None:
            report.closed_loop += audit.closed_loop(padded, starts_of_wave, act, reference_outcome)[: len(wave)]
    return report


def _describe(env: OpenSoraLiberoEnv) -> str:
    cfg = env.config
    steps = env.world_model.sampler.config.num_sampling_steps
    return f"world model ({steps} sampling steps, {cfg.image_size} px, {cfg.dtype})"


@dataclass
class _Outcome:
    """Per sub-env: success, actions taken."""

    success: np.ndarray  # [N] bool
    length: np.ndarray  # [N] int64
    videos: list[str | None] | None = None  # [N] closed-loop video paths, when written
    actions: np.ndarray | None = None  # [N, T, 7] the actions taken, every sub-env stepping until all ended


class _Audit:
    """One audit's envs and settings; `open_loop` and `closed_loop` run one wave of starts."""

    def __init__(self, simulator, world_model_env, reference_env, max_chunks, seed, divergence_psnr, video_folder):
        self.simulator, self.candidate, self.reference_env = simulator, world_model_env, reference_env
        self.reference = reference_env if reference_env is not None else simulator
        self.max_chunks, self.seed, self.divergence_psnr = max_chunks, seed, divergence_psnr
        self.video_folder = None if video_folder is None else Path(video_folder)
        self.size = world_model_env.config.image_size
        self.n = world_model_env.num_envs

    def starts(self, wave: list[tuple[int, int]]) -> dict[str, Any]:
        """Resets the simulator on the wave's initial states: its observation and the world-model start options."""
        options = {"task_id": [t for t, _ in wave], "trial_id": [k for _, k in wave]}
        obs, _ = self.simulator.reset(seed=self.seed, options=options)
        images = to_world_model_frames(obs["image"], self.size)  # [N, S, S, 3]
        return {"start_images": images, "start_tasks": list(obs["task"]), "libero": options, "simulator_obs": obs}

    def _reset(self, env: VectorEnv, starts: dict[str, Any]) -> dict[str, Any]:
        if env is self.simulator:
            return env.reset(seed=self.seed, options=starts["libero"])[0]
        options = {"start_images": starts["start_images"], "start_tasks": starts["start_tasks"]}
        return env.reset(seed=self.seed, options=options)[0]

    def open_loop(
        self, wave: list[tuple[int, int]], starts: dict[str, Any], act: Act | None, recorded: np.ndarray | None
    ) -> tuple[list[OpenLoopEpisode], _Outcome | None]:
        """The open-loop comparison of one wave right after `starts` reset the simulator, and the reference's
        outcome when the policy chose the actions (then it is a closed-loop episode of the policy)."""
        n, chunk = self.n, self.candidate.config.action_chunk
        fresh = self.reference is self.simulator
        reference_obs = starts["simulator_obs"] if fresh else self._reset(self.reference, starts)
        candidate_obs = self._reset(self.candidate, starts)
        panels = []  # the start frames side by side [S, 3 S, 3], for the videos only
        if self.video_folder is not None:
            reference_start = to_world_model_frames(reference_obs["image"], self.size)
            panels = [side_by_side(reference_start[i], candidate_obs["image"][i]) for i in range(n)]
        writers = self._open_writers(wave, "open_loop", panels, starts, OPEN_LOOP_PANELS)
        chunks: list[list[ChunkComparison]] = [[] for _ in range(n)]
        outcome = _Outcome(np.zeros(n, dtype=bool), np.zeros(n, dtype=np.int64))
        alive = np.ones(n, dtype=bool)
        for c in range(self.max_chunks):
            if recorded is not None:
                actions = recorded[:, c * chunk : (c + 1) * chunk]
            else:
                actions = _numpy_actions(act(reference_obs))
            reference_obs, _, ref_terminated, ref_truncated, ref_info = self.reference.step(actions)
            candidate_obs, _, cand_terminated, cand_truncated, cand_info = self.candidate.step(actions)
            # The open loop follows the reference's episode: an imagined success must not restart the world model.
            _continue_past_episode_end(self.candidate, np.flatnonzero(alive & (cand_terminated | cand_truncated)))
            reference_frames = to_world_model_frames(ref_info["frames"], self.size)  # [N, A, S, S, 3]
            executed = ref_info.get("frame_executed", np.ones((n, chunk), dtype=bool))  # [N, A]
            for i in np.flatnonzero(alive):
                kept = executed[i]
                frame_psnr = psnr(reference_frames[i, kept], cand_info["frames"][i, kept])
                frame_ssim = ssim(reference_frames[i, kept], cand_info["frames"][i, kept])
                chunks[i].append(
                    ChunkComparison(
                        chunk=c,
                        frames=int(kept.sum()),
                        psnr=float(frame_psnr.mean()),
                        ssim=float(frame_ssim.mean()),
                        world_model_success=bool(cand_terminated[i]),
                        simulator_success=bool(ref_terminated[i]),
                        max_success_prob=float(cand_info["success_prob"][i].max()),
                    )
                )
                if writers[i] is not None:
                    # The executed frames are the chunk's first ones: the simulator stops a chunk at success.
                    first_step = int(ref_info["episode_length"][i]) - int(kept.sum()) + 1
                    for k in np.flatnonzero(kept):
                        panel = side_by_side(reference_frames[i, k], cand_info["frames"][i, k])
                        caption = _video_caption(starts, i, OPEN_LOOP_PANELS)
                        writers[i].append_data(annotate_frame(panel, caption, first_step + k))
            ended = alive & (ref_terminated | ref_truncated)
            outcome.success[ended] = ref_terminated[ended]
            outcome.length[ended] = ref_info["episode_length"][ended]
            alive &= ~ended
            if not alive.any():
                break
        outcome.length[alive] = self.max_chunks * chunk
        episodes, videos = [], self._close_writers(writers, wave, "open_loop")
        for i, (task_id, trial_id) in enumerate(wave):
            below = [x.chunk for x in chunks[i] if x.psnr < self.divergence_psnr]
            episodes.append(
                OpenLoopEpisode(
                    task_id=task_id,
                    trial_id=trial_id,
                    task=starts["start_tasks"][i],
                    chunks=chunks[i],
                    first_divergence=below[0] if below else None,
                    video=videos[i],
                )
            )
        return episodes, (outcome if recorded is None else None)

    def closed_loop(
        self, wave: list[tuple[int, int]], starts: dict[str, Any], act: Act, reference_outcome: _Outcome | None
    ) -> list[ClosedLoopEpisode]:
        """The policy in the world model (and in the reference unless its open-loop episode was the policy's)."""
        if reference_outcome is None:
            reference_outcome = self._run(self.reference, starts, act)
        candidate_outcome = self._run(self.candidate, starts, act, wave)
        replay = None
        if self.reference is self.simulator:
            replay = self._replay(starts, candidate_outcome.actions, candidate_outcome.length)
        return [
            ClosedLoopEpisode(
                task_id=task_id,
                trial_id=trial_id,
                task=starts["start_tasks"][i],
                simulator_success=bool(reference_outcome.success[i]),
                world_model_success=bool(candidate_outcome.success[i]),
                simulator_length=int(reference_outcome.length[i]),
                world_model_length=int(candidate_outcome.length[i]),
                video=candidate_outcome.videos[i] if candidate_outcome.videos else None,
                replay_success=None if replay is None else bool(replay[i]),
            )
            for i, (task_id, trial_id) in enumerate(wave)
        ]

    def _run(
        self, env: VectorEnv, starts: dict[str, Any], act: Act, wave: list[tuple[int, int]] | None = None
    ) -> _Outcome:
        """Runs the policy in `env` from the starts until every sub-env's episode ended (or `max_chunks`); given
        the `wave` (and a video folder), writes each start's episode in `env`'s frames to a closed-loop video."""
        n, chunk = self.n, self.candidate.config.action_chunk
        obs = self._reset(env, starts)
        writers: list = [None] * n
        if wave is not None:
            writers = self._open_writers(
                wave, "closed_loop", [obs["image"][i] for i in range(n)], starts, CLOSED_LOOP_PANELS
            )
        outcome = _Outcome(np.zeros(n, dtype=bool), np.zeros(n, dtype=np.int64))
        alive = np.ones(n, dtype=bool)
        taken = []  # [N, chunk, 7] per chunk
        for c in range(self.max_chunks):
            taken.append(_numpy_actions(act(obs)))
            obs, _, terminated, truncated, info = env.step(taken[-1])
            for i in np.flatnonzero(alive):
                if writers[i] is not None:
                    for k, frame in enumerate(info["frames"][i]):
                        writers[i].append_data(
                            annotate_frame(frame, _video_caption(starts, i, CLOSED_LOOP_PANELS), c * chunk + k + 1)
                        )
            ended = alive & (terminated | truncated)
            outcome.success[ended] = terminated[ended]
            outcome.length[ended] = info["episode_length"][ended]
            alive &= ~ended
            if not alive.any():
                break
        outcome.length[alive] = self.max_chunks * chunk
        outcome.actions = np.concatenate(taken, axis=1)
        if wave is not None:
            outcome.videos = self._close_writers(writers, wave, "closed_loop")
        return outcome

    def _replay(self, starts: dict[str, Any], actions: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        """The simulator's success [N] when it executes `actions` [N, T, 7] from the starts, each sub-env's first
        `lengths` [N] actions (whole chunks: an episode ends at a chunk's end)."""
        n, chunk = self.n, self.candidate.config.action_chunk
        self._reset(self.simulator, starts)
        success, alive = np.zeros(n, dtype=bool), lengths > 0
        for c in range(math.ceil(lengths.max() / chunk)):
            _, _, terminated, truncated, _ = self.simulator.step(actions[:, c * chunk : (c + 1) * chunk])
            success[alive & terminated] = True
            alive &= ~(terminated | truncated) & ((c + 1) * chunk < lengths)
            if not alive.any():
                break
        return success

    def _close_writers(self, writers: list, wave: list[tuple[int, int]], kind: str) -> list[str | None]:
        """Closes the wave's `kind` video writers; their files' paths (None where there was no writer)."""
        paths: list[str | None] = []
        for writer, (task_id, trial_id) in zip(writers, wave, strict=True):
            if writer is not None:
                writer.close()
            paths.append(None if writer is None else str(self._video_path(kind, task_id, trial_id)))
        return paths

    def _video_path(self, kind: str, task_id: int, trial_id: int) -> Path:
        return self.video_folder / f"{kind}-task{task_id}-trial{trial_id}.mp4"

    def _open_writers(
        self, wave: list[tuple[int, int]], kind: str, first: list[np.ndarray], starts: dict[str, Any], panels: str
    ) -> list:
        """One `kind` video writer per start of the wave, its `first` frame written; None without a video folder
        and for a start repeated in the wave (the padding of a partial wave)."""
        writers: list = [None] * self.n
        if self.video_folder is None:
            return writers
        self.video_folder.mkdir(parents=True, exist_ok=True)
        for i, (task_id, trial_id) in enumerate(wave):
            if (task_id, trial_id) in wave[:i]:
                continue
            writers[i] = imageio.get_writer(self._video_path(kind, task_id, trial_id), fps=10, macro_block_size=1)
            writers[i].append_data(annotate_frame(first[i], _video_caption(starts, i, panels), 0))
        return writers


OPEN_LOOP_PANELS = "simulator | world model | difference"
CLOSED_LOOP_PANELS = "world model"


def _video_caption(starts: dict[str, Any], index: int, panels: str) -> str:
    return f"{panels}: {starts['start_tasks'][index]}"


def _numpy_actions(actions: Any) -> np.ndarray:
    if isinstance(actions, torch.Tensor):
        return actions.detach().float().cpu().numpy()
    return np.asarray(actions, dtype=np.float32)


def _continue_past_episode_end(env: OpenSoraLiberoEnv, indices: np.ndarray) -> None:
    """Clears the end of the sub-envs `indices` so their next step continues the episode (no autoreset)."""
    if len(indices) == 0:
        return
    states = env.get_state(indices.tolist())
    for state in states:
        state.needs_reset = False
    env.set_state(states, indices.tolist())
