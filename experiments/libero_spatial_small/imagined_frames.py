"""Do the world model's imagined rollouts still carry the outcome? A classifier trained on imagined frames.

`branch_discrimination.py` found that the success classifier, trained on the simulator's frames, does not tell the
imagined successes of paired branches from their failures. Either the imagined frames lost the outcome, or that
classifier does not read it in them. This script tells the two apart:

- `write`: for every branch episode of the chosen starts (`branch.py`'s recordings), the world model rolls the rest
  of the episode out from the branch point under the recorded actions, as `branch_discrimination.py` does (same
  seeds), ``--draws`` times (with ``--from-start``, from the episode's first frame: a policy's recorded rollouts;
  with ``--from-frame K``, from recorded frame K, the frames K - 4 .. K - 1 as the condition; with ``--from-end K``,
  from K frames before each episode's end, so that every rollout ends K frames after its condition; with
  ``--one-chunk-ahead``, every chunk from the recorded frames before it, so that no error carries over a chunk);
  each draw is saved as an episode of the imagined frames, each frame labelled with the simulator's success flag of
  the recorded frame at the same index. The file of draw d of recorded episode n is
  ``traj{n}{d:02d}_task{T}_trial{R}.npy``. `opensora-gym train-reward-model` then trains a classifier on them.
  ``--batch`` episodes are imagined side by side (each with its own noise: the frames do not depend on the batch).
- `score`: a classifier's highest success probability over each imagined episode (with ``--last K``, its mean over
  the last K frames), averaged over the draws of one recorded episode, against the simulator's outcome: the AUROC
  and the share of (success, failure) pairs of one start ordered right (ties count one half; 0.5 = no information),
  as `branch_discrimination.py` reports them; without ``--last``, also each draw's verdict as the env gives it (some
  frame at ``--threshold`` or above): the false successes among the draws of real failures, the missed successes.

Trained on the imagined rollouts of some starts and scored on those of others, a classifier above chance shows that
the imagination keeps the outcome where the simulator's classifier misses it.

python experiments/libero_spatial_small/imagined_frames.py write --dataset s64b/dataset --starts 0:0-9 1:0-9 \
    --world-model wm/world_model --action-guidance 3 --draws 2 --out imagined_train
python experiments/libero_spatial_small/imagined_frames.py score --dataset imagined_heldout \
    --classifier rm_imagined/resnet_rm.pth --out score.json
"""

from __future__ import annotations

import argparse
import json
import re
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
from branch_discrimination import (  # the script's folder
    _NAME,
    _order,
    branch_point,
    chunk_actions,
    encode_frames,
    imagine_from,
    load_world_model,
    parse_starts,
    start_groups,
)
from einops import rearrange

from opensora_gym.data import Episode, TrajectoryDataset, save_trajectory
from opensora_gym.models.reward import ResNetRewardModel
from opensora_gym.reliability import auroc
from opensora_gym.spaces import ACTION_CHUNK
from opensora_gym.world_model import WorldModel, frames_from_uint8, frames_to_uint8


def write(args: argparse.Namespace) -> None:
    dataset, starts = TrajectoryDataset(args.dataset), parse_starts(args.starts)
    world_model = load_world_model(args.world_model, args.device, args.action_guidance)
    if args.one_chunk_ahead or args.reconstruct:
        args.out.mkdir(parents=True, exist_ok=True)
        for (task, trial), episodes in start_groups(dataset, starts):
            for episode in episodes:
                if args.reconstruct:
                    draws = reconstruct(world_model, episode)
                else:
                    draws = one_chunk_ahead(world_model, episode, args.draws, task * 100 + trial)
                save_draws(args.out, episode, task, trial, 1, draws)
                print(f"{episode.path.name}: {len(draws)} draws of {draws.shape[1]} frames", flush=True)
        return
    items = []  # (episode, task, trial, the frame it is imagined from)
    for (task, trial), episodes in start_groups(dataset, starts):
        for episode in episodes:
            if args.from_end is not None:
                first = len(episode.images) - args.from_end
            elif args.from_frame is not None:
                first = args.from_frame
            else:
                first = 1 if args.from_start else branch_point(episodes) + 1
            items.append((episode, task, trial, first))
    short = [f"{e.path.name}: frame {i} of {len(e.images)}" for e, _, _, i in items if not 0 < i < len(e.images)]
    if short:
        raise ValueError(f"expected episodes with frames from 1 up to after the one imagined from, got {short}")
    args.out.mkdir(parents=True, exist_ok=True)
    items.sort(key=lambda item: len(item[0].images) - item[3])  # side by side with about as many frames to imagine
    for begin in range(0, len(items), args.batch):
        batch = items[begin : begin + args.batch]
        seeds = [task * 100 + trial for _, task, trial, _ in batch]
        episodes, firsts = [item[0] for item in batch], [item[3] for item in batch]
        _, frames = imagine_from(world_model, episodes, firsts, args.draws, seeds, args.reencode)
        for (episode, task, trial, first), draws in zip(batch, frames, strict=True):
            save_draws(args.out, episode, task, trial, first, draws)
            print(f"{episode.path.name}: {len(draws)} draws of {draws.shape[1]} frames", flush=True)


@torch.no_grad()
def one_chunk_ahead(world_model: WorldModel, episode: Episode, draws: int, seed: int) -> np.ndarray:
    """Every chunk of `episode` imagined from the recorded frames before it under its recorded actions -> the frames
    ``[draws, T - 1, H, W, 3]`` uint8 (frame k at index k - 1, as `imagine_from` from frame 1).

    The chunk of frames ``k .. k + 7`` (k = 1, 9, 17, ...) has the recorded frames ``k - Tc .. k - 1`` as its
    condition (frame 0 for those before it) and actions ``k - 1 .. k + 6`` (the last repeated past the end): the
    world model's error of one chunk, without what it carries over from its own frames. All chunks of one draw are
    imagined side by side; (chunk c, draw d) takes its noise from a generator seeded ``seed * 1000 + c * draws + d``.
    """
    context, length = world_model.condition_frames, len(episode.images)
    starts = np.arange(1, length, ACTION_CHUNK)  # [K]
    recorded = np.maximum(starts[:, None] + np.arange(-context, 0)[None], 0)  # [K, Tc]
    condition = torch.from_numpy(episode.images[recorded]).repeat_interleave(draws, dim=0)  # [K * draws, Tc, H, W, 3]
    generators = [torch.Generator().manual_seed(seed * 1000 + index) for index in range(len(condition))]
    latents = encode_frames(world_model, condition, generators)
    actions = np.stack([chunk_actions(episode, start) for start in starts])  # [K, A, action_dim]
    actions = torch.from_numpy(actions).float().repeat_interleave(draws, dim=0)
    frames = world_model.predict_chunk(latents, actions, generator=generators).frames.cpu().numpy()
    frames = rearrange(frames, "(k d) a h w c -> d (k a) h w c", d=draws)
    return frames[:, : length - 1]


@torch.no_grad()
def reconstruct(world_model: WorldModel, episode: Episode) -> np.ndarray:
    """The recorded frames 1 .. T - 1 through the world model's VAE alone (posterior mean, decoded) -> ``[1, T - 1, H,
    W, 3]`` uint8: what the latents can show at best, no dynamics."""
    frames = frames_from_uint8(torch.from_numpy(episode.images[1:]), world_model.image_size)
    frames = rearrange(frames, "t c h w -> 1 c t h w").to(world_model.device, world_model.vae.dtype)
    return frames_to_uint8(world_model.vae.decode(world_model.vae.encode(frames, sample=False))).cpu().numpy()


def save_draws(out: Path, episode: Episode, task: int, trial: int, first: int, draws: np.ndarray) -> None:
    """Each draw's imagined frames as an episode, labelled with the recorded frames' success flags."""
    flags = np.zeros(len(episode.images), dtype=bool) if episode.success is None else episode.success
    number = int(_NAME.search(episode.path.name)[1])
    for draw, imagined in enumerate(draws):
        steps = [
            {
                "image": image,
                "delta_action": episode.actions[first + k],
                "instruction": episode.task,
                "success": bool(flags[first + k]),
            }
            for k, image in enumerate(imagined)
        ]
        save_trajectory(out / f"traj{number}{draw:02d}_task{task:02d}_trial{trial:02d}.npy", steps)


def score_name(last: int | None) -> str:
    """The name of an episode's score: its highest success probability, or (`last` K) the mean over its last K
    frames, the state it ends in (the same number of frames for every episode: a failure, recorded to the time limit,
    is not scored over more frames than a success that stopped after its place)."""
    return "peak_probability" if last is None else "end_probability"


@torch.no_grad()
def score(args: argparse.Namespace) -> None:
    dataset = TrajectoryDataset(args.dataset)
    classifier = ResNetRewardModel.from_pretrained(args.classifier).eval()
    by_draw: dict[str, list[float]] = defaultdict(list)
    outcome: dict[str, bool] = {}
    start_of: dict[str, tuple[int, int]] = {}
    for index, path in enumerate(dataset.paths):
        match = re.search(r"traj(\d+)(\d\d)_task(\d+)_trial(\d+)\.npy$", path.name)
        if match is None:
            raise ValueError(f"expected files written by `write` (traj<n><draw>_task<T>_trial<R>.npy), got {path}")
        episode = dataset.episode(index)
        probability = classifier(frames_from_uint8(torch.from_numpy(episode.images), args.image_size))
        key = match[1]
        by_draw[key].append(float(probability.max() if args.last is None else probability[-args.last :].mean()))
        outcome[key] = bool(episode.success is not None and episode.success.any())
        start_of[key] = (int(match[3]), int(match[4]))
    name = score_name(args.last)
    keys = sorted(by_draw)
    value = np.array([np.mean(by_draw[key]) for key in keys])  # mean over the draws
    real = np.array([outcome[key] for key in keys])
    pairs = [
        _order(value[a], value[b])
        for a in range(len(keys))
        for b in range(len(keys))
        if real[a] and not real[b] and start_of[keys[a]] == start_of[keys[b]]
    ]
    summary = {
        "episodes": len(keys),
        "real_successes": int(real.sum()),
        f"auroc_{name}": auroc(value, real) if 0 < real.sum() < len(real) else None,
        f"pairs_ordered_right_by_{name}": float(np.mean(pairs)) if pairs else None,
        "pairs": len(pairs),
        "false_success": int(((value > 0.5) & ~real).sum()),
        "missed": int(((value <= 0.5) & real).sum()),
    }
    if args.last is None:  # the env's verdict on each draw: success if some frame reaches the threshold
        called = [(probability >= args.threshold, outcome[key]) for key in keys for probability in by_draw[key]]
        failures = [verdict for verdict, success in called if not success]
        successes = [verdict for verdict, success in called if success]
        summary.update(
            {
                "threshold": args.threshold,
                "draws_false_success": f"{sum(failures)}/{len(failures)}",
                "draws_missed": f"{len(successes) - sum(successes)}/{len(successes)}",
                "draws_agreement": f"{len(failures) - sum(failures) + sum(successes)}/{len(called)}",
            }
        )
    print(json.dumps(summary))
    rows = [{"episode": key, "real": bool(r), name: float(p)} for key, r, p in zip(keys, real, value, strict=True)]
    args.out.write_text(json.dumps({"summary": summary, "episodes": rows}, indent=2) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    writer = commands.add_parser("write", help="save the imagined rollouts of branch episodes, labelled")
    writer.add_argument("--dataset", type=Path, required=True, help="branch.py's episodes (dataset/traj*.npy)")
    writer.add_argument("--starts", nargs="+", required=True, help="TASK:FIRST-LAST trial ranges")
    writer.add_argument("--world-model", required=True, help="world-model folder (or embedded:<name>)")
    writer.add_argument("--draws", type=int, default=2, help="rollouts per episode")
    writer.add_argument("--action-guidance", type=float, default=1.0, help="the sampler's guidance (1: none)")
    writer.add_argument("--device", default="cpu", help="torch device")
    writer.add_argument("--batch", type=int, default=16, help="episodes imagined side by side")
    where = writer.add_mutually_exclusive_group()
    where.add_argument(
        "--from-start",
        action="store_true",
        help="imagine each episode from its first frame (as the env starts; e.g. a policy's recorded rollouts), "
        "not from the point where its start's branches part",
    )
    where.add_argument(
        "--from-frame",
        type=int,
        help="imagine each episode from this recorded frame on (its 4 frames before as the condition): how far "
        "into an episode the imagined outcome starts to follow the real one",
    )
    where.add_argument(
        "--from-end",
        type=int,
        help="imagine each episode from this many frames before its end (its 4 frames before as the condition): "
        "how many frames ahead of the state an episode ends in the world model still draws it (score --last)",
    )
    where.add_argument(
        "--one-chunk-ahead",
        action="store_true",
        help="imagine every chunk from the recorded frames before it (the error of one chunk, none carried over)",
    )
    where.add_argument(
        "--reconstruct",
        action="store_true",
        help="no dynamics: the recorded frames through the VAE only (what its latents can show; one draw)",
    )
    writer.add_argument(
        "--reencode",
        action="store_true",
        help="condition each chunk on the last imagined frames encoded again, not on their sampled latents",
    )
    writer.add_argument("--out", type=Path, required=True, help="folder for the imagined episodes")
    scorer = commands.add_parser("score", help="AUROC and pairs of a classifier on imagined episodes")
    scorer.add_argument("--dataset", type=Path, required=True, help="a folder written by `write`")
    scorer.add_argument("--classifier", type=Path, required=True, help="resnet_rm.pth")
    scorer.add_argument("--image-size", type=int, default=64, help="the classifier's input side")
    scorer.add_argument(
        "--last",
        type=int,
        help="score each episode by the mean probability over its last K frames (end_probability), not its peak",
    )
    scorer.add_argument(
        "--threshold",
        type=float,
        default=0.9,
        help="without --last: also each draw's verdict as the env gives it (a frame at this probability or above)",
    )
    scorer.add_argument("--out", type=Path, required=True, help="JSON output")
    args = parser.parse_args()
    if args.command == "write" and min(args.draws, args.batch) < 1:
        parser.error(f"--draws and --batch must be >= 1, got {args.draws} and {args.batch}")
    if args.command == "score" and args.last is not None and args.last < 1:
        parser.error(f"--last must be >= 1, got {args.last}")
    if args.command == "write" and args.reencode and (args.one_chunk_ahead or args.reconstruct):
        parser.error("--reencode applies to imagined rollouts, not to --one-chunk-ahead or --reconstruct")
    for name in ("from_frame", "from_end"):
        if args.command == "write" and getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    write(args) if args.command == "write" else score(args)


if __name__ == "__main__":
    main()
