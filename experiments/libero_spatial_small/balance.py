"""The simulator's replays of imagined groups, balanced by outcome per start: a world model's alignment set.

python experiments/libero_spatial_small/balance.py --replays replay_d0.json replay_d1.json \
    --recorded rec_d0 rec_d1 --with pre/dataset --out mixb

Each `--replays` JSON (`from_recorded.py --imagined ... --out`) goes with the `--recorded` folder that the same run
wrote (`--record`), in the order given. For every start (task, trial) the replays of all draws are pooled; a start
whose replays all succeed or all fail is dropped, and from the others the first k successes and the first k failures
in draw order are kept, k the smaller count, so each start adds as many real successes as failures (WMPO mixes its
positive and negative rollouts). The episodes are copied to `OUT/dataset/` renumbered in start order, then the
episodes of each `--with` dataset folder after them (e.g. the base's own recorded rollouts); `OUT/balanced.json`
lists the kept replays. Nothing is written when a replay has no recorded file or a start more than one.
"""

from __future__ import annotations

import argparse
import json
import shutil
from collections import defaultdict
from pathlib import Path

from opensora_gym.data import TrajectoryDataset


def recorded_file(folder: Path, task: int, trial: int) -> Path:
    """The one episode file of `folder` (a `--record` output, with dataset/) for this task and trial."""
    found = sorted((folder / "dataset").glob(f"traj*_task{task:02d}_trial{trial:02d}.npy"))
    if len(found) != 1:
        raise SystemExit(f"expected one recorded file of task {task} trial {trial} in {folder}, found {len(found)}")
    return found[0]


def balanced(rows: list[tuple[int, int, int, bool]]) -> list[tuple[int, int, int, bool]]:
    """Of (task, trial, draw, real success) rows, each mixed start's first k successes and first k failures by draw."""
    by_start: dict[tuple[int, int], list[tuple[int, bool]]] = defaultdict(list)
    for task, trial, draw, success in rows:
        by_start[(task, trial)].append((draw, success))
    kept = []
    for (task, trial), outcomes in sorted(by_start.items()):
        outcomes.sort()
        successes = [draw for draw, success in outcomes if success]
        failures = [draw for draw, success in outcomes if not success]
        k = min(len(successes), len(failures))
        kept += [(task, trial, draw, True) for draw in successes[:k]]
        kept += [(task, trial, draw, False) for draw in failures[:k]]
    return kept


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--replays", nargs="+", required=True, help="from_recorded.py JSONs, one per draw")
    parser.add_argument("--recorded", nargs="+", required=True, help="their --record folders, in the same order")
    parser.add_argument("--with", dest="extra", nargs="*", default=[], help="dataset folders appended after them")
    parser.add_argument("--out", required=True, help="output folder: dataset/ and balanced.json")
    args = parser.parse_args()
    if len(args.replays) != len(args.recorded):
        parser.error(f"--replays and --recorded pair up: got {len(args.replays)} JSONs, {len(args.recorded)} folders")
    out = Path(args.out) / "dataset"
    if out.exists():
        raise SystemExit(f"{out} exists: give a new --out folder")
    rows, sources = [], {}
    for draw, (replay, folder) in enumerate(zip(args.replays, args.recorded, strict=True)):
        for start in json.loads(Path(replay).read_text())["starts"]:
            key = (start["task"], start["trial"], draw)
            if key in sources:
                raise SystemExit(f"{replay} holds task {key[0]} trial {key[1]} twice")
            sources[key] = recorded_file(Path(folder), start["task"], start["trial"])
            rows.append((*key, bool(start["real_success"])))
    kept = balanced(rows)
    copies = [(sources[(task, trial, draw)], f"task{task:02d}_trial{trial:02d}") for task, trial, draw, _ in kept]
    for folder in args.extra:
        for path in TrajectoryDataset(Path(folder)).paths:
            copies.append((path, path.stem.split("_", 1)[1] if "_" in path.stem else ""))
    out.mkdir(parents=True)
    for number, (path, suffix) in enumerate(copies):
        shutil.copyfile(path, out / f"traj{number:06d}_{suffix}.npy")
    listing = [
        {"task": task, "trial": trial, "replay": args.replays[draw], "real_success": success}
        for task, trial, draw, success in kept
    ]
    (out.parent / "balanced.json").write_text(json.dumps({"kept": listing, "with": args.extra}, indent=1) + "\n")
    starts = len({(row["task"], row["trial"]) for row in listing})
    print(
        f"{len(kept)} replays of {starts} starts ({sum(r['real_success'] for r in listing)} successes) "
        f"+ {len(copies) - len(kept)} episodes -> {out}"
    )


if __name__ == "__main__":
    main()
