"""Real-LIBERO episodes that start inside recorded rollouts, as the world-model env's `start_frame` does.

python experiments/libero_spatial_small/from_recorded.py s12/dataset --last 48 --policy BASE --out real.json
python experiments/libero_spatial_small/from_recorded.py s12/dataset --last 48 --imagined imagined.npz --draw 0 \
    --out replayed.json

For every episode file of the dataset (recorded by `opensora-gym collect`: its name and frames give the task and
the initial state, its rows every executed action), the simulator resets to that initial state and replays the
recorded actions up to the start, `--last` frames before the file's last frame (the env's `start_frame="end-K"`).
The frame it reaches, resized to the file's side as `shrink.py` resizes, is checked against the recorded one. From
there it runs `--steps` actions (the short episode's limit), either of

- `--policy`: a policy acting on the simulator's frames (greedy, or `--do-sample` at `--temperature`);
- `--imagined`: the actions a policy chose in the world model from the same start (`imagine.py`'s npz over a
  dataset of the same files in the same order, draw `--draw`), up to the imagined episode's end. Against the
  imagined outcome this is the audit's replay: an imagined success the simulator does not give is a false success
  of the world model's dynamics, with no policy in between.

`--record DIR` also writes each episode as a collect-format file (`DIR/dataset/traj*.npy`, the dataset's side):
the recorded `--context` frames before the start, then the simulator's frames of the executed actions with LIBERO's
per-frame success flags (with `--imagined` every imagined action runs, also past a success): data in which the
world model sees what its own choices really do.

Writes JSON: one row per start (file, task, trial, start, recorded and real outcome, the start frame's largest pixel
difference) and the real success with its 95% Wilson interval, over all starts and split by the recorded outcome;
with `--imagined` also the imagined outcomes and `opensora_gym.audit.success_agreement` (false-success rate etc.).
"""

from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path

import numpy as np
import torch

from opensora_gym.audit import success_agreement
from opensora_gym.convert import write_statistics
from opensora_gym.data import ActionStatistics, TrajectoryDataset, save_trajectory
from opensora_gym.intervals import wilson_interval
from opensora_gym.libero import LiberoConfig, LiberoVectorEnv
from opensora_gym.wrappers.trajectory_recorder import episode_frames
from trainers.behavior_cloning import resize_images
from trainers.build import load_policy


def task_and_trial(path: Path) -> tuple[int, int]:
    """The (task, trial) a collect file's name gives (``traj{e}_task{t}_trial{k}.npy``)."""
    found = re.search(r"task(\d+)_trial(\d+)", path.name)
    if found is None:
        raise SystemExit(f"file {path.name} names no task and trial (expected ..._taskNN_trialNN.npy)")
    return int(found[1]), int(found[2])


def rate(outcomes: np.ndarray) -> dict:
    """Success count, rate and 95% Wilson interval of boolean outcomes."""
    low, high = wilson_interval(int(outcomes.sum()), len(outcomes))
    return {
        "successes": int(outcomes.sum()),
        "episodes": len(outcomes),
        "rate": float(outcomes.mean()),
        "ci_low": low,
        "ci_high": high,
    }


def summary(rows: list[dict]) -> dict:
    """The real success over all starts and split by the recorded rollout's outcome; with imagined outcomes, the
    agreement of the two (false-success rate: imagined success among the real failures)."""
    real = np.array([row["real_success"] for row in rows])
    recorded = np.array([row["recorded_success"] for row in rows])
    out = {"real": rate(real)}
    for name, chosen in (("from_recorded_successes", recorded), ("from_recorded_failures", ~recorded)):
        if chosen.any():
            out[name] = rate(real[chosen])
    if "imagined_success" in rows[0]:
        imagined = np.array([row["imagined_success"] for row in rows])
        out["imagined"] = rate(imagined)
        out["agreement"] = success_agreement(imagined, real).to_dict()
    return out


def record(path: Path, episode, pair: tuple[int, int], start: int, context: int, executed: list[dict]) -> np.ndarray:
    """Writes the recorded frames ``start - context .. start`` and the executed chunks as one episode file; returns
    its executed actions ``[T, 7]``."""
    first = max(start - context, 0)
    side = episode.images.shape[1]
    frames = np.concatenate([chunk["frames"] for chunk in executed])
    images = [*episode.images[first : start + 1], *resize_images(frames, side).numpy()]
    actions = np.concatenate([episode.actions[first:start], *[chunk["controller_actions"] for chunk in executed]])
    flags = [*episode.success[first : start + 1], *np.concatenate([chunk["frame_success"] for chunk in executed])]
    task = episode.task
    save_trajectory(path, episode_frames(images, actions, task, *pair, episode.init_ee_pose, flags))
    return actions


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("dataset", help="the recorded dataset folder (traj*.npy of `opensora-gym collect`)")
    parser.add_argument("--out", required=True, help="the JSON to write")
    parser.add_argument("--last", type=int, required=True, help="start K frames before each file's last frame")
    parser.add_argument("--steps", type=int, default=48, help="actions per episode from the start")
    actor = parser.add_mutually_exclusive_group(required=True)
    actor.add_argument("--policy", help="a policy folder acting on the simulator's frames")
    actor.add_argument("--imagined", help="imagine.py's npz: replay the actions chosen in the world model")
    parser.add_argument("--draw", type=int, default=0, help="which of the npz's draws of every start")
    parser.add_argument("--do-sample", action="store_true", help="sample the policy's actions (else greedy)")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0, help="LIBERO's scene seed of the recording, and sampling's")
    parser.add_argument("--image-size", type=int, default=128, help="the simulator's render side (the recording's)")
    parser.add_argument("--num-envs", type=int, default=2)
    parser.add_argument("--first", type=int, default=0, help="the first file to run")
    parser.add_argument("--count", type=int, help="files to run (default: all from --first)")
    parser.add_argument("--record", help="also write the episodes as a dataset folder (DIR/dataset/traj*.npy)")
    parser.add_argument("--context", type=int, default=8, help="recorded frames before the start in --record's files")
    args = parser.parse_args(argv)
    if args.last < 0 or args.steps < 1:
        parser.error(f"--last must be >= 0 and --steps >= 1, got {args.last} and {args.steps}")
    dataset = TrajectoryDataset(args.dataset)
    files = list(range(len(dataset)))[args.first :][: args.count]
    episodes = [dataset.episode(index) for index in files]
    pairs = [task_and_trial(dataset.paths[index]) for index in files]
    imagined = None
    if args.imagined:
        imagined = dict(np.load(args.imagined))
        rows = np.arange(len(files)) + args.first + args.draw * len(dataset)
        if rows[-1] >= len(imagined["task"]):
            raise SystemExit(
                f"{args.imagined} has {len(imagined['task'])} episodes, no draw {args.draw} of file {files[-1]}"
            )
        for row, pair in zip(rows, pairs, strict=True):
            if (imagined["task"][row], imagined["trial"][row]) != pair:
                raise SystemExit(
                    f"imagined episode {row} is task {imagined['task'][row]} trial "
                    f"{imagined['trial'][row]}, the dataset's file is task {pair[0]} trial {pair[1]}: "
                    "not the same files in the same order"
                )
    policy = None if args.policy is None else load_policy(args.policy, "cpu")
    generator = torch.Generator().manual_seed(args.seed)
    config = LiberoConfig.from_protocol(
        "openvla_oft",
        args.steps,
        image_size=args.image_size,
        return_frames=args.record is not None,
        post_success_steps=args.steps if imagined is not None and args.record else 0,
    )
    if args.record:
        (Path(args.record) / "dataset").mkdir(parents=True, exist_ok=True)
    env = LiberoVectorEnv(config, num_envs=args.num_envs)
    chunk, results, began, recorded_actions = config.action_chunk, [], time.time(), []
    try:
        for wave in range(0, len(episodes), args.num_envs):
            chosen = list(range(wave, min(wave + args.num_envs, len(episodes))))
            padded = chosen + [chosen[0]] * (args.num_envs - len(chosen))
            starts = [len(episodes[i].images) - 1 - args.last for i in padded]
            if min(starts) < 0:
                raise SystemExit(f"a file of the wave {files[wave]}.. has fewer than {args.last + 1} frames")
            obs, _ = env.reset(
                seed=args.seed,
                options={
                    "task_id": [pairs[i][0] for i in padded],
                    "trial_id": [pairs[i][1] for i in padded],
                    "replay_actions": [episodes[i].actions[:s] for i, s in zip(padded, starts, strict=True)],
                },
            )
            side = episodes[chosen[0]].images.shape[1]
            reached = resize_images(obs["image"], side).numpy().astype(np.int16)
            alive = np.ones(args.num_envs, dtype=bool)
            alive[len(chosen) :] = False
            success = np.zeros(args.num_envs, dtype=bool)
            length = np.zeros(args.num_envs, dtype=np.int64)
            limit = np.full(args.num_envs, args.steps)
            executed: list[list[dict]] = [[] for _ in padded]
            if imagined is not None:
                rows = [i + args.first + args.draw * len(dataset) for i in padded]
                limit = imagined["length"][rows]
            for step in range(0, args.steps, chunk):
                if policy is not None:
                    actions = policy.act(
                        obs, do_sample=args.do_sample, temperature=args.temperature, generator=generator
                    ).actions
                else:
                    actions = imagined["actions"][rows, step : step + chunk]
                obs, _, terminated, truncated, info = env.step(actions)
                if args.record:
                    for k in np.flatnonzero(alive):
                        done = info["frame_executed"][k]
                        executed[k].append(
                            {key: info[key][k][done] for key in ("frames", "controller_actions", "frame_success")}
                        )
                ended = alive & (terminated | truncated | (step + chunk >= limit))
                success[ended] = info["success_once"][ended]
                length[ended] = info["episode_length"][ended]
                alive &= ~ended
                if not alive.any():
                    break
            for k, i in enumerate(chosen):
                episode = episodes[i]
                row = {
                    "file": dataset.paths[files[i]].name,
                    "task": pairs[i][0],
                    "trial": pairs[i][1],
                    "start": starts[k],
                    "recorded_success": bool(episode.success.any()),
                    "real_success": bool(success[k]),
                    "length": int(length[k]),
                    "start_frame_max_diff": int(np.abs(reached[k] - episode.images[starts[k]]).max()),
                }
                if imagined is not None:
                    row["imagined_success"] = bool(imagined["success"][rows[k]])
                    row["imagined_length"] = int(imagined["length"][rows[k]])
                results.append(row)
                if args.record:
                    number = files[i] + args.draw * len(dataset)
                    name = f"traj{number:06d}_task{pairs[i][0]:02d}_trial{pairs[i][1]:02d}.npy"
                    recorded_actions.append(
                        record(
                            Path(args.record) / "dataset" / name,
                            episode,
                            pairs[i],
                            starts[k],
                            args.context,
                            executed[k],
                        )
                    )
            done = len(results)
            print(
                f"{done}/{len(episodes)} starts, real success {np.mean([r['real_success'] for r in results]):.3f}, "
                f"{(time.time() - began) / done:.1f} s a start",
                flush=True,
            )
    finally:
        env.close()
    if args.record:
        statistics = ActionStatistics.from_actions(np.concatenate(recorded_actions), flat_range=(-1.0, 1.0))
        write_statistics(Path(args.record), statistics)
    report = {
        "dataset": Path(args.dataset).name,
        "last": args.last,
        "steps": args.steps,
        "actor": {"policy": args.policy, "do_sample": args.do_sample, "temperature": args.temperature}
        if policy is not None
        else {"imagined": Path(args.imagined).name, "draw": args.draw},
        "seed": args.seed,
        "seconds": round(time.time() - began),
        **summary(results),
        "starts": results,
    }
    Path(args.out).write_text(json.dumps(report, indent=1))
    print(json.dumps({key: value for key, value in report.items() if key != "starts"}, indent=1))


if __name__ == "__main__":
    main()
