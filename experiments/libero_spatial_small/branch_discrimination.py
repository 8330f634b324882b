"""Does the world model tell a successful place from a failed one when only the actions differ? Paired branches.

`branch.py` records several episodes per start that share their frames and actions up to the end of the lift and
then place the bowl at different points; LIBERO says which succeed. For every episode the world model is given the
4 recorded frames before the first action where the start's branches part, and rolls out the rest of the episode
under the recorded actions from its own predictions (as the env does), ``--draws`` times with noise seeds shared by
the start's branches (so only the actions differ between them). An episode's imagined success is the share of
draws in which some frame's classifier probability exceeds 0.5 (the env's 0/1 reward).

It prints and writes, per world model: the agreement of the imagined with the real outcome (false success: real
failures imagined as successes in the majority of draws; missed: real successes imagined as failures), the AUROC
of the imagined success share against the real outcome, and, over every pair of branches of one start with
different real outcomes, the share that the world model orders right (ties count one half; 0.5 = blind to the
actions); the same two measures also for a finer score, the classifier's highest probability over the imagined
frames (mean over draws), which still ranks episodes when few draws cross 0.5. As a check of the reward model
alone, it also counts the recorded episodes whose own frames (from the branch point) the classifier calls a success
against LIBERO's flag.

How far the imagined frames follow the actions, over every pair of branches of one start and the frames both
still have: the response (the mean absolute pixel difference between the two imagined branches over that between
the two recorded ones; 0 = the world model ignores the actions, 1 = it moves as much as the simulator) and the share
of draws in which each imagined branch lies nearer its own recorded branch than the other's (0.5 = blind); both
also over the last 8 frames the two branches have, where the outcome shows.

python experiments/libero_spatial_small/branch_discrimination.py --dataset s64b/dataset --starts 0:12-14 1:12-14 \
    --world-model embedded:libero_spatial_small wm/world_model --out discrimination.json --device cuda
"""

from __future__ import annotations

import argparse
import json
import re
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
from einops import rearrange

from opensora_gym.audit import success_agreement
from opensora_gym.checkpoint import resolve_checkpoint
from opensora_gym.data import Episode, TrajectoryDataset
from opensora_gym.reliability import auroc
from opensora_gym.spaces import ACTION_CHUNK
from opensora_gym.world_model import WorldModel, frames_from_uint8

_NAME = re.compile(r"traj(\d+)_task(\d+)_trial(\d+)\.npy$")


def parse_starts(values: list[str]) -> set[tuple[int, int]]:
    """``TASK:FIRST-LAST`` (or ``TASK:TRIAL``) items -> the set of (task, trial) starts."""
    starts = set()
    for value in values:
        match = re.fullmatch(r"(\d+):(\d+)(?:-(\d+))?", value)
        if match is None:
            raise ValueError(f"a start range must look like TASK:FIRST-LAST or TASK:TRIAL, got {value!r}")
        task, first, last = int(match[1]), int(match[2]), int(match[3] or match[2])
        starts.update((task, trial) for trial in range(first, last + 1))
    return starts


def start_groups(dataset: TrajectoryDataset, starts: set) -> list[tuple[tuple[int, int], list[Episode]]]:
    """The episodes of each chosen (task, trial) start, in start order."""
    groups: dict[tuple[int, int], list[int]] = defaultdict(list)
    for index, path in enumerate(dataset.paths):
        match = _NAME.search(path.name)
        if match and (int(match[2]), int(match[3])) in starts:
            groups[int(match[2]), int(match[3])].append(index)
    if not groups:
        raise ValueError(f"no episode of the chosen starts {sorted(starts)} in {dataset.paths[0].parent}")
    return [(start, [dataset.episode(index) for index in indices]) for start, indices in sorted(groups.items())]


def load_world_model(name: str, device: str, action_guidance: float) -> WorldModel:
    """A world-model folder (or embedded:<name>) at 64 px in float32, sampled with `action_guidance`."""
    return WorldModel.from_pretrained(
        resolve_checkpoint(name, "spatial"),
        device=device,
        dtype=torch.float32,
        image_size=64,
        action_guidance=action_guidance,
    )


def branch_point(episodes: list[Episode]) -> int:
    """The first action index at which the episodes of one start differ (they share every action before it)."""
    length = min(len(episode.actions) for episode in episodes)
    same = np.ones(length, dtype=bool)
    for episode in episodes[1:]:
        same &= np.all(episode.actions[:length] == episodes[0].actions[:length], axis=1)
    if same.all():
        raise ValueError(f"the episodes of {episodes[0].path.name}'s start never part: not branches of one start")
    return int(np.argmin(same))


def encode_frames(world_model: WorldModel, images: torch.Tensor, generators: list[torch.Generator]) -> torch.Tensor:
    """uint8 frames ``[N, T, H, W, 3]`` -> condition latents ``[N, C, T, h, w]`` float32: a posterior sample of each
    frame, sub-env n's noise from ``generators[n]``, as the env encodes its start frames."""
    frames = frames_from_uint8(rearrange(images, "n t h w c -> (n t) h w c"), world_model.image_size)
    frames = rearrange(frames, "(n t) c h w -> n c t h w", n=len(images))
    return world_model.vae.encode(
        frames.to(world_model.device, world_model.vae.dtype), sample=True, generator=generators
    ).float()


def chunk_actions(episode: Episode, start: int) -> np.ndarray:
    """The recorded actions ``start - 1 .. start + A - 2`` that yield frames ``start .. start + A - 1`` ``[A,
    action_dim]`` (the last action repeated past the episode's end)."""
    steps = np.arange(start - 1, start - 1 + ACTION_CHUNK)
    return episode.actions[np.minimum(steps, len(episode.actions) - 1)]


@torch.no_grad()
def imagine_from(
    world_model: WorldModel,
    episodes: list[Episode],
    first: int | list[int],
    draws: int,
    seeds: list[int],
    reencode: bool = False,
) -> tuple[np.ndarray, list[np.ndarray]]:
    """Imagine `episodes` side by side from frame `first` on (one for all, or one per episode) under their recorded
    actions, `draws` times each -> the highest success probability over each draw's imagined frames ``[E, draws]``
    and, per episode, the imagined frames ``[draws, T - first, H, W, 3]`` uint8 (T: that episode's length).

    The condition is the recorded frames ``[first - Tc, first)``, frame 0 standing in for those before it (as the
    env repeats its start frame); frame ``k`` follows action ``k - 1`` (the dataset's convention); an episode with
    fewer frames left than the longest repeats its last action, and the frames after its end are dropped. Draw d of
    episode e takes its noise from a generator seeded ``seeds[e] * 1000 + d``, so it does not depend on the other
    episodes. With `reencode`, the next chunk's condition is the last decoded uint8 frames encoded again (a posterior
    sample, as the recorded frames are) instead of the sampled latents.
    """
    context, size = world_model.condition_frames, world_model.image_size
    firsts = np.broadcast_to(np.asarray(first), (len(episodes),))
    recorded = np.maximum(firsts[:, None] + np.arange(-context, 0)[None], 0)  # [E, Tc]
    condition = np.stack([episode.images[rows] for episode, rows in zip(episodes, recorded, strict=True)])
    condition = torch.from_numpy(condition)  # [E, Tc, H, W, 3]
    generators = [torch.Generator().manual_seed(seed * 1000 + draw) for seed in seeds for draw in range(draws)]
    latents = encode_frames(world_model, condition.repeat_interleave(draws, dim=0), generators)
    left = np.array([len(episode.images) for episode in episodes]) - firsts  # frames to imagine per episode
    peak, frames = np.zeros((len(episodes), draws)), []
    for offset in range(0, left.max(), ACTION_CHUNK):
        chunk = np.stack([chunk_actions(episode, f + offset) for episode, f in zip(episodes, firsts, strict=True)])
        chunk = torch.from_numpy(chunk).float().repeat_interleave(draws, dim=0)
        prediction = world_model.predict_chunk(latents, chunk, generator=generators)
        inside = torch.from_numpy(offset + np.arange(ACTION_CHUNK)[None] < left[:, None])  # [E, A]
        probability = prediction.success_prob.cpu().reshape(len(episodes), draws, ACTION_CHUNK)
        peak = np.maximum(peak, probability.masked_fill(~inside[:, None], 0).amax(dim=2).numpy())
        frames.append(prediction.frames.cpu().numpy())  # [E * draws, A, H, W, 3]
        if reencode:
            latents = encode_frames(world_model, prediction.frames[:, -context:], generators)
        else:
            latents = torch.cat([latents, prediction.latents.float()], dim=2)[:, :, -context:]
    frames = np.concatenate(frames, axis=1).reshape(len(episodes), draws, -1, size, size, 3)
    return peak, [imagined[:, :count] for imagined, count in zip(frames, left, strict=True)]


def action_response(
    imagined: tuple[np.ndarray, np.ndarray], recorded: tuple[np.ndarray, np.ndarray], last: int | None = None
) -> tuple[float, float]:
    """For two branches: their imagined ``[draws, T, H, W, 3]`` and recorded ``[T, H, W, 3]`` frames from the branch
    point -> (imagined over recorded mean absolute difference between the branches, share of draws in which each
    imagined branch is nearer its own recorded branch than the other's), over the frames both have (only the `last`
    of them when given: where the outcome shows)."""
    length = min(len(recorded[0]), len(recorded[1]))
    window = slice(0 if last is None else max(length - last, 0), length)
    (ia, ib), (ra, rb) = ([x[..., window, :, :, :].astype(np.float32) for x in pair] for pair in (imagined, recorded))
    axes = (1, 2, 3, 4)  # per draw: over frames and pixels
    real = float(np.abs(ra - rb).mean())
    if real == 0:
        raise ValueError("two branches of one start have the same recorded frames after their branch point")
    between = np.abs(ia - ib).mean(axis=axes)
    own = np.abs(ia - ra).mean(axis=axes) + np.abs(ib - rb).mean(axis=axes)
    crossed = np.abs(ia - rb).mean(axis=axes) + np.abs(ib - ra).mean(axis=axes)
    return float(between.mean() / real), float(np.mean(np.where(own == crossed, 0.5, own < crossed)))


def _order(success_score: float, failure_score: float) -> float:
    """1 if a pair's real success scores above its real failure, 0.5 for a tie, else 0."""
    return 1.0 if success_score > failure_score else 0.5 if success_score == failure_score else 0.0


@torch.no_grad()
def classifier_on_recorded(world_model: WorldModel, episode: Episode, first: int) -> bool:
    """Whether the classifier gives some recorded frame from `first` on a success probability above 0.5."""
    frames = frames_from_uint8(torch.from_numpy(episode.images[first:]), world_model.image_size)
    probability = world_model.reward_model(
        frames.to(world_model.device, next(world_model.reward_model.parameters()).dtype)
    )
    return bool((probability > 0.5).any())


def discrimination(world_model: WorldModel, dataset: TrajectoryDataset, starts: set, draws: int) -> dict:
    """Rows per episode and the summary measures over the chosen starts."""
    rows, pairs, responses = [], [], []
    for (task, trial), episodes in start_groups(dataset, starts):
        size = episodes[0].images.shape[1:3]
        if size != (world_model.image_size, world_model.image_size):
            raise ValueError(
                f"the episodes must be recorded at the world model's {world_model.image_size} px, got {size} "
                f"({episodes[0].path.name}): shrink them first (shrink.py)"
            )
        first = branch_point(episodes) + 1
        peak, frames = imagine_from(world_model, episodes, first, draws, [task * 100 + trial] * len(episodes))
        shares, peaks = (peak > 0.5).mean(axis=1).tolist(), peak.mean(axis=1).tolist()
        for index, episode in enumerate(episodes):
            real = bool(episode.success is not None and episode.success[first:].any())
            seen = classifier_on_recorded(world_model, episode, first)
            rows.append(
                {
                    "episode": episode.path.name,
                    "branch_frame": first,
                    "real": real,
                    "imagined": shares[index],
                    "peak_probability": peaks[index],
                    "classifier_on_recorded": seen,
                }
            )
            print(
                f"{episode.path.name}: frame {first}, real {real}, imagined {shares[index]:.2f}, seen {seen}",
                flush=True,
            )
        outcome = [row["real"] for row in rows[-len(episodes) :]]
        for a in range(len(episodes)):
            for b in range(len(episodes)):
                if outcome[a] and not outcome[b]:
                    pairs.append([_order(shares[a], shares[b]), _order(peaks[a], peaks[b])])
                if a < b:
                    recorded = (episodes[a].images[first:], episodes[b].images[first:])
                    imagined_pair = (frames[a], frames[b])
                    last = action_response(imagined_pair, recorded, last=ACTION_CHUNK)
                    responses.append([*action_response(imagined_pair, recorded), *last])
    real = np.array([row["real"] for row in rows])
    share = np.array([row["imagined"] for row in rows])
    rates = success_agreement(share > 0.5, real).rates()  # counts and 95% Wilson intervals
    summary = {"episodes": len(rows), "real_successes": int(real.sum())}
    for name, key, of in (("false_success", "false_success_rate", ~real), ("missed", "missed_success_rate", real)):
        rate = rates[key] or {"count": 0, "ci_low": float("nan"), "ci_high": float("nan")}  # None: nothing to count
        summary[name] = {"count": rate["count"], "of": int(of.sum()), "wilson_95": [rate["ci_low"], rate["ci_high"]]}
    peak = np.array([row["peak_probability"] for row in rows])
    both = 0 < real.sum() < len(real)
    summary["auroc"] = auroc(share, real) if both else None
    summary["auroc_peak_probability"] = auroc(peak, real) if both else None
    seen = success_agreement([row["classifier_on_recorded"] for row in rows], real)
    summary["classifier_on_recorded"] = {"false_success": seen.false_success, "missed": seen.missed_success}
    by_share, by_peak = np.array(pairs).reshape(-1, 2).T
    summary["pairs_ordered_right"] = {"share": float(by_share.mean()) if pairs else None, "pairs": len(pairs)}
    summary["pairs_ordered_right_by_peak_probability"] = float(by_peak.mean()) if pairs else None
    ratio, own, last_ratio, last_own = np.array(responses).reshape(-1, 4).T
    summary["action_response"] = {
        "median_ratio": float(np.median(ratio)) if len(ratio) else None,
        "nearer_own_branch": float(own.mean()) if len(own) else None,
        "last_chunk_median_ratio": float(np.median(last_ratio)) if len(ratio) else None,
        "last_chunk_nearer_own_branch": float(last_own.mean()) if len(ratio) else None,
        "pairs": len(ratio),
    }
    return {"summary": summary, "episodes": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", type=Path, required=True, help="branch.py's episodes (dataset/traj*.npy)")
    parser.add_argument("--starts", nargs="+", required=True, help="TASK:FIRST-LAST trial ranges to measure")
    parser.add_argument("--world-model", nargs="+", required=True, help="world-model folders (or embedded:<name>)")
    parser.add_argument("--draws", type=int, default=3, help="rollouts per episode (odd: no tied majority)")
    parser.add_argument(
        "--action-guidance", type=float, default=1.0, help="the sampler's guidance by the actions (1: none)"
    )
    parser.add_argument("--device", default="cpu", help="torch device")
    parser.add_argument("--out", type=Path, required=True, help="JSON output")
    args = parser.parse_args()
    if args.draws < 1:
        parser.error(f"--draws must be >= 1, got {args.draws}")
    dataset, starts = TrajectoryDataset(args.dataset), parse_starts(args.starts)
    results = {}
    for name in args.world_model:
        world_model = load_world_model(name, args.device, args.action_guidance)
        results[name] = discrimination(world_model, dataset, starts, args.draws)
        print(name, json.dumps(results[name]["summary"]), flush=True)
    settings = {"draws": args.draws, "action_guidance": args.action_guidance}
    args.out.write_text(json.dumps({**settings, "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
