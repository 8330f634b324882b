"""The simulator executes the actions the policy chose in the world model, recorded as a dataset: what they really do.

python experiments/libero_spatial_small/replay.py imagined.npz --out data/replay --task-ids 0 1 \
    --trial-ids $(seq 0 39) --num-envs 2

For every (task, trial) of the plan, the first imagined success of `imagine.py`'s npz at that start is replayed
from the same LIBERO initial state (`--all-outcomes`: the first episode, success or not); past the imagined
episode's end the arm holds still, the gripper as last commanded. Recorded as `opensora-gym collect` records
(the simulator's frames and per-frame success, `--post-success-steps` after a success), so the world model and the
classifier train on them as on any recording.
"""

from __future__ import annotations

import argparse
from typing import Any

import numpy as np

from opensora_gym.collect import CollectConfig, collect_episodes
from opensora_gym.libero import LiberoConfig, LiberoVectorEnv


class ImaginedActions:
    """A collect actor that plays each episode's recorded actions (`opensora_gym.collect.Actor`)."""

    action_chunk = 8

    def __init__(self, actions_of: dict[int, np.ndarray], num_envs: int):
        self.actions_of = actions_of  # episode number -> [T, 7]
        self.rows: list[np.ndarray | None] = [None] * num_envs
        self.played = [0] * num_envs

    def begin(self, index: int, seed: Any) -> None:
        self.rows[index], self.played[index] = self.actions_of[seed[1]], 0

    def act(self, observation: dict[str, Any], info: dict[str, Any]) -> np.ndarray:
        out = np.zeros((len(self.rows), self.action_chunk, 7), dtype=np.float32)
        for index, rows in enumerate(self.rows):
            chunk = rows[self.played[index] : self.played[index] + self.action_chunk]
            out[index, : len(chunk)] = chunk
            out[index, len(chunk) :, 6] = rows[-1, 6]  # past the imagined end: hold, the gripper as it was
            self.played[index] += self.action_chunk
        return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("imagined", help="imagine.py's npz")
    parser.add_argument("--out", required=True, help="output folder (dataset/, dataset_statistics.json)")
    parser.add_argument("--task-ids", type=int, nargs="+", required=True)
    parser.add_argument("--trial-ids", type=int, nargs="+", required=True)
    parser.add_argument("--all-outcomes", action="store_true", help="replay imagined failures too")
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--num-envs", type=int, default=1)
    parser.add_argument("--max-episode-steps", type=int, default=192)
    parser.add_argument("--post-success-steps", type=int, default=24)
    args = parser.parse_args(argv)
    imagined = dict(np.load(args.imagined))
    first: dict[tuple[int, int], int] = {}
    for k, start in enumerate(zip(imagined["task"].tolist(), imagined["trial"].tolist(), strict=True)):
        if (args.all_outcomes or imagined["success"][k]) and start not in first:
            first[start] = k
    config = CollectConfig(
        output=args.out,
        task_ids=tuple(args.task_ids),
        trial_ids=tuple(args.trial_ids),
        image_size=args.image_size,
        num_envs=args.num_envs,
        max_episode_steps=args.max_episode_steps,
        post_success_steps=args.post_success_steps,
    )
    probe = LiberoVectorEnv(LiberoConfig(suite=config.suite, image_size=args.image_size), num_envs=1)
    walk = [pair for pair in probe.walk if pair[0] in config.task_ids and pair[1] in config.trial_ids]
    probe.close()
    missing = [pair for pair in walk if pair not in first]
    if missing:
        raise SystemExit(f"no imagined episode to replay for the starts {missing}: choose other task/trial ids")
    actions_of = {
        episode: imagined["actions"][first[pair], : imagined["length"][first[pair]]]
        for episode, pair in enumerate(walk)
    }
    episodes = collect_episodes(config, ImaginedActions(actions_of, args.num_envs))
    print(f"replayed {len(episodes)} episodes: simulator success {np.mean([e.success for e in episodes]):.3f}")


if __name__ == "__main__":
    main()
