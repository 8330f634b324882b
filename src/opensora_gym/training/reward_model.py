"""Training the ResNet success classifier on frames labelled by the simulator's per-frame success flag.

Episodes are split into training and held-out ones (never frames of one episode on both sides); training batches
are class-balanced (success and non-success frames drawn equally often). The held-out report uses the env's
decision rule, `round(probability)` (half to even, so 0.5 is no success):

- accuracy over frames;
- expected calibration error: frames binned by probability into `bins` equal-width bins,
  `ECE = sum_b (n_b / N) * |fraction of successes in b - mean probability in b|`;
- per episode, the false-success rate (frames the classifier calls a success among those the simulator does not)
  and the missed-success rate (frames it calls no success among the simulator's successes).
"""

from __future__ import annotations

import json
import math
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from opensora_gym.checkpoint import REWARD_WEIGHTS_NAME
from opensora_gym.data import TrajectoryDataset, load_trajectory
from opensora_gym.models.reward import ResNetRewardModel
from opensora_gym.world_model import frames_from_uint8

REPORT_NAME = "reward_report.json"


@dataclass
class RewardTrainingConfig:
    """A reward-classifier training run.

    Attributes:
        dataset: folder of `traj*.npy` episodes whose frames carry the success flag.
        out: where `resnet_rm.pth` and `reward_report.json` are written.
        image_size: side the frames are resized to (the env's image size: it scores frames of that size).
        widths: the ResNet's stage widths (the released classifier: 64, 128, 256, 512).
        success_key: the per-frame key of the success flag.
        success_window: a frame is labelled a success when one of the next `success_window - 1` frames of its
            episode, or itself, carries the flag. 1 (the default) trains on the flag as recorded. LIBERO ends an
            episode at its first success frame, so a recording holds a single success frame per episode, and a
            classifier trained on it learns that exact frame (the object touching its target under the gripper)
            and misses the slightly different frames a world model predicts; a window of a few frames also labels
            the last steps of the placing motion.
        held_out_fraction: fraction of the episodes held out for the report (at least one episode).
        batch_size: frames per step.
        max_steps: optimizer steps.
        lr: AdamW learning rate.
        bins: calibration bins of the expected calibration error.
        seed: initial weights, the episode split and the batches.
        device: torch device.
        log_every: steps between printed losses.
    """

    dataset: Path
    out: Path
    image_size: int = 256
    widths: tuple[int, int, int, int] = (64, 128, 256, 512)
    success_key: str = "success"
    success_window: int = 1
    held_out_fraction: float = 0.2
    batch_size: int = 64
    max_steps: int = 1000
    lr: float = 1e-3
    bins: int = 10
    seed: int = 0
    device: str = "cpu"
    log_every: int = 100

    def __post_init__(self) -> None:
        self.dataset, self.out = Path(self.dataset), Path(self.out)
        self.widths = tuple(int(w) for w in self.widths)
        for name in ("image_size", "batch_size", "max_steps", "bins", "log_every", "success_window"):
            if getattr(self, name) < 1:
                raise ValueError(f"RewardTrainingConfig.{name} must be a positive integer, got {getattr(self, name)}")
        if len(self.widths) != 4 or min(self.widths) < 1:
            raise ValueError(f"RewardTrainingConfig.widths must be 4 positive integers, got {self.widths}")
        if not 0.0 < self.held_out_fraction < 1.0:
            raise ValueError(f"RewardTrainingConfig.held_out_fraction must be in (0, 1), got {self.held_out_fraction}")
        if self.lr <= 0:
            raise ValueError(f"RewardTrainingConfig.lr must be > 0, got {self.lr}")


@dataclass
class EpisodeReport:
    """Held-out results of one episode (rates are NaN when the episode has no frame of that class).

    Attributes:
        episode: the episode file name.
        frames: number of frames.
        success_frames: frames the simulator marks as a success.
        false_success_rate: predicted success among the simulator's non-success frames.
        missed_success_rate: predicted non-success among the simulator's success frames.
    """

    episode: str
    frames: int
    success_frames: int
    false_success_rate: float
    missed_success_rate: float


@dataclass
class RewardReport:
    """Held-out results over all frames, and per episode (`to_json` writes the NaN rates as null).

    Attributes:
        accuracy: fraction of frames where `round(prob)` equals the label.
        ece: expected calibration error (see the module docstring).
        false_success_rate: over all held-out non-success frames.
        missed_success_rate: over all held-out success frames.
        frames: number of held-out frames.
        episodes: per-episode results.
    """

    accuracy: float
    ece: float
    false_success_rate: float
    missed_success_rate: float
    frames: int
    episodes: list[EpisodeReport] = field(default_factory=list)

    def table(self) -> str:
        lines = [
            f"held-out frames {self.frames}: accuracy {self.accuracy:.3f}, ECE {self.ece:.3f}, "
            f"false-success rate {self.false_success_rate:.3f}, missed-success rate {self.missed_success_rate:.3f}",
            f"{'episode':<40} {'frames':>6} {'success':>7} {'false-success':>13} {'missed':>7}",
        ]
        lines += [
            f"{e.episode:<40} {e.frames:>6} {e.success_frames:>7} {e.false_success_rate:>13.3f} "
            f"{e.missed_success_rate:>7.3f}"
            for e in self.episodes
        ]
        return "\n".join(lines)

    def to_json(self) -> str:
        """The report as JSON; a rate that is NaN (no frame of its class) is written as null, valid JSON."""
        plain = asdict(self)
        for row in [plain, *plain["episodes"]]:
            for key in ("false_success_rate", "missed_success_rate"):
                row[key] = None if math.isnan(row[key]) else row[key]
        return json.dumps(plain, indent=2, allow_nan=False) + "\n"


def _rate(hits: torch.Tensor, among: torch.Tensor) -> float:
    """Fraction of `among` frames that are `hits` (NaN when there are none)."""
    count = int(among.sum())
    return float((hits & among).sum()) / count if count else math.nan


def classification_report(
    prob: torch.Tensor, labels: torch.Tensor, episode_ids: torch.Tensor, episode_names: list[str], bins: int = 10
) -> RewardReport:
    """Accuracy, calibration and false-success / missed-success rates at the env's rounding threshold.

    Args:
        prob: success probabilities [N].
        labels: the simulator's success flags [N] (bool or 0/1).
        episode_ids: the episode index of each frame [N], indexing `episode_names`.
        episode_names: one name per episode.
        bins: equal-width probability bins of the ECE.
    """
    prob = prob.double()
    labels = labels.bool()
    predicted = torch.round(prob).bool()  # the env's rule: round half to even
    which_bin = (prob * bins).long().clamp(0, bins - 1)  # [N]
    ece = 0.0
    for b in range(bins):
        in_bin = which_bin == b
        if in_bin.any():
            ece += float(in_bin.double().mean()) * abs(float(labels[in_bin].double().mean() - prob[in_bin].mean()))
    episodes = []
    for index, name in enumerate(episode_names):
        mine = episode_ids == index
        if not mine.any():
            continue
        episodes.append(
            EpisodeReport(
                episode=name,
                frames=int(mine.sum()),
                success_frames=int((labels & mine).sum()),
                false_success_rate=_rate(predicted, ~labels & mine),
                missed_success_rate=_rate(~predicted, labels & mine),
            )
        )
    return RewardReport(
        accuracy=float((predicted == labels).double().mean()),
        ece=ece,
        false_success_rate=_rate(predicted, ~labels),
        missed_success_rate=_rate(~predicted, labels),
        frames=len(labels),
        episodes=episodes,
    )


def load_labelled_frames(
    dataset: TrajectoryDataset, success_key: str, success_window: int = 1
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Frames [N, H, W, 3] uint8, success labels [N] bool and episode indices [N] int64 of every episode.

    A frame's label is true when its own flag or one of the next `success_window - 1` flags of its episode is.
    """
    images, labels, episodes = [], [], []
    for index, path in enumerate(dataset.paths):
        frames = load_trajectory(path)
        missing = [t for t, frame in enumerate(frames) if success_key not in frame]
        if missing:
            raise ValueError(
                f"{path} frames {missing[:5]} have no {success_key!r} flag (the reward model is trained on a "
                "per-frame success flag recorded from the simulator)"
            )
        images.append(dataset.episode(index).images)
        flags = np.array([bool(frame[success_key]) for frame in frames])
        # frame t is labelled by the flags t .. t + window - 1: a sliding maximum over the flags, looking ahead
        padded = np.concatenate([flags, np.zeros(success_window - 1, dtype=bool)])
        labels.append(np.lib.stride_tricks.sliding_window_view(padded, success_window).any(axis=1))
        episodes.append(np.full(len(frames), index, dtype=np.int64))
    return np.concatenate(images), np.concatenate(labels), np.concatenate(episodes)


@torch.no_grad()
def predict_frames(model: ResNetRewardModel, images: torch.Tensor, image_size: int, device) -> torch.Tensor:
    """Success probabilities [N] of uint8 frames [N, H, W, 3], in eval mode, 256 frames at a time."""
    return torch.cat(
        [model.predict(frames_from_uint8(chunk, image_size).to(device))[0].cpu() for chunk in images.split(256)]
    )


def train_reward_model(config: RewardTrainingConfig) -> tuple[RewardReport, Path]:
    """Trains the classifier, writes `out/resnet_rm.pth` and `out/reward_report.json`.

    Returns:
        the held-out report and the weights' path.
    """
    dataset = TrajectoryDataset(config.dataset)
    if len(dataset) < 2:
        raise ValueError(f"need at least 2 episodes to hold one out, got {len(dataset)} in {config.dataset}")
    labelled = load_labelled_frames(dataset, config.success_key, config.success_window)
    images, labels, episode_ids = (torch.from_numpy(a) for a in labelled)
    generator = torch.Generator().manual_seed(config.seed)
    held_out_count = min(max(1, round(config.held_out_fraction * len(dataset))), len(dataset) - 1)
    held_out = torch.randperm(len(dataset), generator=generator)[:held_out_count]
    is_held_out = torch.isin(episode_ids, held_out)
    train_labels = labels[~is_held_out]
    counts = torch.stack([(~train_labels).sum(), train_labels.sum()])  # [2]: non-success, success
    if (counts == 0).any():
        raise ValueError(
            f"the training episodes have {int(counts[1])} success and {int(counts[0])} non-success frames; "
            "both classes are needed"
        )
    weights = 1.0 / counts[train_labels.long()].double()  # class-balanced: each class drawn half the time
    train_index = torch.nonzero(~is_held_out).flatten()

    device = torch.device(config.device)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        model = ResNetRewardModel(config.widths)
    model = model.to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr)
    for step in range(1, config.max_steps + 1):
        batch = train_index[torch.multinomial(weights, config.batch_size, replacement=True, generator=generator)]
        prob = model(frames_from_uint8(images[batch], config.image_size).to(device)).clamp(1e-6, 1 - 1e-6)
        loss = torch.nn.functional.binary_cross_entropy(prob, labels[batch].float().to(device))
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite reward-model loss {float(loss)} at step {step}; stopping")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % config.log_every == 0:
            print(f"reward step {step}: loss {loss.item():.4f}")

    model.eval()
    prob = predict_frames(model, images[is_held_out], config.image_size, device)
    report = classification_report(
        prob, labels[is_held_out], episode_ids[is_held_out], [p.name for p in dataset.paths], config.bins
    )
    for name, tensor in model.state_dict().items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise FloatingPointError(f"reward-model parameter {name} has non-finite values; not saving")
    config.out.mkdir(parents=True, exist_ok=True)
    tmp = config.out / (REWARD_WEIGHTS_NAME + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    os.replace(model.cpu().save_pretrained(tmp), config.out / REWARD_WEIGHTS_NAME)
    shutil.rmtree(tmp)
    (config.out / REPORT_NAME).write_text(report.to_json())
    return report, config.out / REWARD_WEIGHTS_NAME
