"""Does the env's reliability signal rise where the world model is wrong? Checked against recorded episodes.

For every chosen episode of a recorded dataset (default: the checkpoint's `dataset/`), the world model replays
the recorded actions open loop from the episode's first frame, chunk by chunk (predicted frame j of chunk c stands
for recorded frame c * A + j + 1), and each chunk gets:

- both signals of `opensora_gym.reliability`: `draw_disagreement` of `--draws` samples and
  `classifier_uncertainty` of draw 0's success probabilities;
- its frame error: the mean squared error of draw 0's uint8 frames against the recorded frames (resized to the
  world model's size through the env's [-1, 1] round trip);
- a false success: the world model's classifier says success on some predicted frame (rounded probability 1)
  while the real outcome of those frames is no success. Real outcomes come from `--outcomes`, a JSON file
  `{"<episode index>": <first successful frame index or null>}` (recorded rollouts: the simulator's success
  flag); without it, from the same classifier applied to the recorded frames.

It reports, for each signal, the Spearman correlation with the frame error and the AUROC of predicting a false
success (rank-based, `opensora_gym.reliability`); a statistic whose labels or values are constant is null, with
the reason. Prints one table and writes JSON (default `benchmarks/results/reliability_validation.json`).

    python benchmarks/reliability_validation.py --checkpoint DIR --outcomes outcomes.json --device cuda
    python benchmarks/reliability_validation.py --tiny   # random tiny checkpoint on the CPU: checks the script
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from einops import rearrange

from opensora_gym.data import TrajectoryDataset
from opensora_gym.env import DTYPES
from opensora_gym.presets import make_tiny_checkpoint
from opensora_gym.reliability import auroc, classifier_uncertainty, spearman
from opensora_gym.spaces import ACTION_CHUNK
from opensora_gym.world_model import WorldModel, frames_from_uint8, frames_to_uint8

RESULTS = Path(__file__).resolve().parent / "results"


@dataclass(frozen=True)
class ChunkRecord:
    """One replayed chunk.

    Attributes:
        episode, chunk: where it is.
        draw_disagreement, classifier_uncertainty: the two signals.
        frame_error: mean squared error of the predicted uint8 frames against the recorded ones.
        predicted_success, real_success: some frame of the chunk is a success, by the world model / in reality.
    """

    episode: int
    chunk: int
    draw_disagreement: float
    classifier_uncertainty: float
    frame_error: float
    predicted_success: bool
    real_success: bool

    @property
    def false_success(self) -> bool:
        return self.predicted_success and not self.real_success


def recorded_frames(world_model: WorldModel, images: np.ndarray) -> torch.Tensor:
    """Recorded frames [T, H, W, 3] uint8 -> [T, S, S, 3] uint8 at the world model's size, as the env observes."""
    normalized = frames_from_uint8(torch.from_numpy(images), world_model.image_size)  # [T, 3, S, S]
    return frames_to_uint8(rearrange(normalized, "t c h w -> 1 c t h w"))[0]


@torch.no_grad()
def replay_episode(
    world_model: WorldModel,
    dataset: TrajectoryDataset,
    episode: int,
    *,
    num_draws: int,
    seed: int,
    max_chunks: int,
    first_success: int | str | None = "classifier",
) -> list[ChunkRecord]:
    """Replays episode `episode`'s recorded actions open loop and scores each chunk (see the module docstring).

    Args:
        num_draws: K >= 2 samples per chunk for the draw disagreement.
        seed: seeds draw 0's noise (`seed`) and the extra draws' (`seed + 1`).
        max_chunks: at most this many chunks of the episode.
        first_success: the real outcome: the index of the first successful recorded frame, None for an episode
            that never succeeds, or `"classifier"` to label the recorded frames with the world model's classifier.
    """
    recorded = dataset.episode(episode)
    num_chunks = min(max_chunks, (len(recorded.images) - 1) // ACTION_CHUNK)
    real = recorded_frames(world_model, recorded.images)  # [T, S, S, 3]
    if first_success == "classifier":
        real_prob = world_model.reward_model(frames_from_uint8(real, world_model.image_size).to(world_model.device))
        real_label = real_prob.round().bool().cpu().numpy()  # [T]
    else:
        real_label = np.arange(len(real)) >= (len(real) if first_success is None else first_success)
    start = torch.from_numpy(recorded.images[:1])  # [1, H, W, 3]
    generator = torch.Generator().manual_seed(seed)
    draw_generator = torch.Generator().manual_seed(seed + 1)
    latents = world_model.encode_start(start, generator=generator)  # [1, C, Tc, h, w]
    records = []
    for c in range(num_chunks):
        frames = slice(c * ACTION_CHUNK + 1, (c + 1) * ACTION_CHUNK + 1)
        actions = torch.from_numpy(recorded.actions[c * ACTION_CHUNK : (c + 1) * ACTION_CHUNK])[None]  # [1, A, 7]
        prediction = world_model.predict_chunk(
            latents, actions, generator=generator, num_draws=num_draws, draw_generator=draw_generator
        )
        probs = prediction.success_prob.cpu().numpy()  # [1, A]
        error = (prediction.frames[0].cpu().float() - real[frames].float()).pow(2).mean()
        records.append(
            ChunkRecord(
                episode=episode,
                chunk=c,
                draw_disagreement=float(prediction.draw_disagreement[0]),
                classifier_uncertainty=float(classifier_uncertainty(probs)[0]),
                frame_error=float(error),
                predicted_success=bool(probs.round().max() >= 1),
                real_success=bool(real_label[frames].any()),
            )
        )
        latents = prediction.latents[:, :, -world_model.condition_frames :]
    return records


def statistics(records: list[ChunkRecord]) -> dict:
    """Spearman with the frame error and AUROC for false successes, per signal; null with a reason if undefined."""
    errors = np.array([r.frame_error for r in records])
    false_success = np.array([r.false_success for r in records])
    out = {"chunks": len(records), "false_successes": int(false_success.sum())}
    for signal in ("draw_disagreement", "classifier_uncertainty"):
        values = np.array([getattr(r, signal) for r in records])
        for name, statistic, target in (
            ("spearman_frame_error", spearman, errors),
            ("auroc_false_success", auroc, false_success),
        ):
            try:
                out[f"{signal}/{name}"] = statistic(values, target)
            except ValueError as error:
                out[f"{signal}/{name}"] = None
                out[f"{signal}/{name}_undefined"] = str(error)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", type=Path, help="world-model folder in the released layout")
    source.add_argument("--tiny", action="store_true", help="a tiny random checkpoint on the CPU (checks the script)")
    parser.add_argument("--dataset", type=Path, help="recorded episodes (default: the checkpoint's dataset/)")
    parser.add_argument("--outcomes", type=Path, help="JSON {episode index: first successful frame or null}")
    parser.add_argument("--episodes", type=int, default=50, help="first N episodes of the dataset")
    parser.add_argument("--max-chunks", type=int, default=32, help="chunks per episode at most")
    parser.add_argument("--draws", type=int, default=4, help="K samples per chunk for the draw disagreement")
    parser.add_argument("--num-sampling-steps", type=int, default=10, help="rectified-flow steps (tiny: 2)")
    parser.add_argument("--image-size", type=int, default=256, help="frame side (tiny: 64)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=RESULTS / "reliability_validation.json")
    args = parser.parse_args(argv)
    if args.draws < 2:
        parser.error(f"--draws must be at least 2, got {args.draws}")

    with tempfile.TemporaryDirectory(prefix="reliability_") as workdir:
        checkpoint = make_tiny_checkpoint(Path(workdir) / "tiny") if args.tiny else args.checkpoint
        steps, size = (2, 64) if args.tiny else (args.num_sampling_steps, args.image_size)
        world_model = WorldModel.from_pretrained(
            checkpoint, device=args.device, dtype=DTYPES[args.dtype], num_sampling_steps=steps, image_size=size
        )
        dataset = TrajectoryDataset(args.dataset or Path(checkpoint) / "dataset")
        outcomes = json.loads(args.outcomes.read_text()) if args.outcomes else None
        records = []
        for episode in range(min(args.episodes, len(dataset))):
            if outcomes is not None and str(episode) not in outcomes:
                raise KeyError(f"--outcomes has no entry for episode {episode} (keys: episode indices as strings)")
            first_success = "classifier" if outcomes is None else outcomes[str(episode)]
            records += replay_episode(
                world_model,
                dataset,
                episode,
                num_draws=args.draws,
                seed=args.seed + 1000 * episode,
                max_chunks=args.max_chunks,
                first_success=first_success,
            )
    result = statistics(records)
    result["config"] = {key: str(value) for key, value in vars(args).items()}
    result["records"] = [{**vars(r), "false_success": r.false_success} for r in records]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"{result['chunks']} chunks, {result['false_successes']} false successes")
    print("signal                 | Spearman(frame error) | AUROC(false success)")
    for signal in ("draw_disagreement", "classifier_uncertainty"):
        cells = [result[f"{signal}/{name}"] for name in ("spearman_frame_error", "auroc_false_success")]
        print(f"{signal:<22} | " + " | ".join(f"{'n/a' if v is None else f'{v:.3f}':<21}" for v in cells))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
