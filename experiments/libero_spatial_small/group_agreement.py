"""Does the world model's verdict point GRPO the simulator's way inside a group? Imagined against real outcomes of
the same actions, start by start.

python experiments/libero_spatial_small/group_agreement.py --replays replay_d0.json ... replay_d7.json \
    --out group_agreement.json

Each `--replays` file is `from_recorded.py --imagined`'s JSON for one draw of the same imagination over the same
starts (draw d of every start): together, for every start, the G imagined episodes of one GRPO group and the
simulator's outcomes of the same actions from the same state. GRPO's update follows each episode's advantage, its
outcome minus its group's mean; the update points the simulator's way as far as the imagined advantages correlate
with the real ones. Reports, over all starts:

- the episode-level agreement (`opensora_gym.audit.success_agreement`: false-success rate, missed successes);
- the share of groups whose imagined outcomes differ (GRPO's `rollout/groups_with_signal`), whose real outcomes
  differ (what an update with the simulator's reward would learn from), both, and only the imagined ones (groups
  whose whole update is the world model's noise: the simulator scores all their episodes alike);
- `advantage_correlation`: sum over groups and episodes of imagined x real advantage, over the square root of the
  two sums of squares (1: every group ranks its episodes as the simulator does, 0: no relation, < 0: the other
  way), with a 95% bootstrap interval over starts;
- `normalized_advantage_correlation`: the same with each group's advantages divided by its standard deviation, as
  GRPO's update weighs them (`trainers.advantages.compute_grpo_advantages`): where graded scores give every group
  some spread, this is the measure of GRPO's signal, with its bootstrap interval;
- `pair_accuracy`: within groups, of the pairs of episodes that the world model ranks one above the other, the
  share the simulator ranks the same way (pairs the simulator ties count as neither), with a bootstrap interval.

Where undefined they are null (JSON): the correlation where no group's imagined outcomes or no group's real ones
differ, the pair accuracy where no group's both do.

`--scores imagined.npz --score KEY` ranks each group by a graded imagined score instead of the 0/1 imagined outcome:
the npz `imagine.py` wrote for these replays (draw d of start i in row d x starts + i) and one of its per-episode
scores (`peak_probability`, `final_probability`): whether grading the world model's verdict would point GRPO the
simulator's way more often. The episode-level agreement stays on the 0/1 outcomes.

`--against` takes the replays of another imagination over the same starts (another world model, another seed; ranked
by their 0/1 imagined outcomes) and adds its correlation and pair accuracy and the difference of the two correlations
(this minus that) with a paired 95% bootstrap interval: every round resamples the same starts for both.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from opensora_gym.audit import success_agreement
from opensora_gym.intervals import wilson_rate
from trainers.advantages import compute_grpo_advantages


def read_reports(paths: list[str]) -> list[dict]:
    """The replay JSONs, one per draw."""
    return [json.loads(Path(path).read_text()) for path in paths]


def load_groups(paths: list[str], reports: list[dict]) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Imagined and real outcomes ``[starts, G]`` from the replay JSONs ``reports`` read from ``paths``, one per draw;
    raises if the starts differ."""
    files = [row["file"] for row in reports[0]["starts"]]
    for path, report in zip(paths, reports, strict=True):
        theirs = [row["file"] for row in report["starts"]]
        if theirs != files:
            raise SystemExit(f"{path} replays other starts than {paths[0]} (expected the same files in the same order)")
        if "imagined_success" not in report["starts"][0]:
            raise SystemExit(f"{path} has no imagined outcomes (expected from_recorded.py --imagined's JSON)")
    imagined = np.array([[row["imagined_success"] for row in report["starts"]] for report in reports]).T
    real = np.array([[row["real_success"] for row in report["starts"]] for report in reports]).T
    return imagined.astype(float), real.astype(float), files


def load_scores(path: str, key: str, replays: list[str], reports: list[dict]) -> np.ndarray:
    """The graded imagined scores ``[starts, G]`` of the episodes of the replay JSONs ``reports`` (read from
    ``replays``) from their imagination's npz; raises if its rows are not those episodes (task, trial and imagined
    outcome)."""
    data = np.load(path)
    if key not in data.files:
        raise SystemExit(f"{path} has no {key!r} (expected one of the scores imagine.py writes, it holds {data.files})")
    starts = len(reports[0]["starts"])
    if len(data["task"]) % starts:
        raise SystemExit(f"{path} has {len(data['task'])} episodes, not a whole number of draws of {starts} starts")
    scores = []
    for replay, report in zip(replays, reports, strict=True):
        draw = report.get("actor", {}).get("draw")
        if draw is None or (draw + 1) * starts > len(data["task"]):
            raise SystemExit(f"{replay} replays no draw of {path} (expected from_recorded.py --imagined --draw d)")
        rows = np.arange(starts) + draw * starts
        expected = [(row["task"], row["trial"], bool(row["imagined_success"])) for row in report["starts"]]
        found = list(
            zip(data["task"][rows].tolist(), data["trial"][rows].tolist(), data["success"][rows].tolist(), strict=True)
        )
        if found != expected:
            raise SystemExit(f"{path}'s draw {draw} is not the imagination {replay} replays (task, trial, outcome)")
        scores.append(data[key][rows].astype(float))
    return np.stack(scores, axis=1)


def advantage_correlation(imagined: np.ndarray, real: np.ndarray, normalized: bool = False) -> float:
    """Pooled correlation of within-group advantages (outcome minus the group's mean; ``normalized``: GRPO's, over
    the group's unbiased standard deviation + 1e-6); nan without variance (the report writes it as null)."""
    a, b = (advantages(scores, normalized) for scores in (imagined, real))
    denominator = np.sqrt((a * a).sum() * (b * b).sum())
    return float((a * b).sum() / denominator) if denominator > 0 else float("nan")


def advantages(scores: np.ndarray, normalized: bool) -> np.ndarray:
    """Each episode's score minus its group's mean ``[starts, G]``; if ``normalized``, GRPO's own advantages."""
    if normalized:
        grouped = compute_grpo_advantages(torch.from_numpy(scores.ravel()), scores.shape[1])
        return grouped.numpy().reshape(scores.shape)
    return scores - scores.mean(axis=1, keepdims=True)


def pair_counts(imagined: np.ndarray, real: np.ndarray) -> tuple[int, int]:
    """Within-group pairs the world model ranks apart and the simulator too: (same order, opposite order)."""
    di = np.sign(imagined[:, :, None] - imagined[:, None, :])
    dr = np.sign(real[:, :, None] - real[:, None, :])
    upper = np.triu(np.ones(imagined.shape[1], dtype=bool), k=1)
    ranked = (di != 0) & (dr != 0) & upper
    same = int((ranked & (di == dr)).sum())
    return same, int(ranked.sum()) - same


def interval(values: list[float]) -> list[float]:
    """95% percentile interval of the finite values; [] where there are none."""
    finite = np.array(values)[np.isfinite(values)]
    return [float(np.percentile(finite, 2.5)), float(np.percentile(finite, 97.5))] if len(finite) else []


def bootstrap(imagined: np.ndarray, real: np.ndarray, rounds: int, seed: int) -> dict:
    """95% percentile intervals of the advantage correlation and the pair accuracy, starts resampled."""
    rng = np.random.default_rng(seed)
    correlations, normalized, accuracies = [], [], []
    for _ in range(rounds):
        pick = rng.integers(0, len(imagined), len(imagined))
        correlations.append(advantage_correlation(imagined[pick], real[pick]))
        normalized.append(advantage_correlation(imagined[pick], real[pick], normalized=True))
        same, opposite = pair_counts(imagined[pick], real[pick])
        if same + opposite:
            accuracies.append(same / (same + opposite))
    return {
        "advantage_correlation": interval(correlations),
        "normalized_advantage_correlation": interval(normalized),
        "pair_accuracy": interval(accuracies),
    }


def correlation_difference(first: tuple, second: tuple, rounds: int, seed: int) -> list[float]:
    """95% percentile interval of the first ``(imagined, real)``'s advantage correlation minus the second's, the same
    starts resampled for both; [] where no round defines both."""
    rng = np.random.default_rng(seed)
    differences = []
    for _ in range(rounds):
        pick = rng.integers(0, len(first[0]), len(first[0]))
        differences.append(
            advantage_correlation(*(part[pick] for part in first))
            - advantage_correlation(*(part[pick] for part in second))
        )
    return interval(differences)


def finite_or_none(value: float) -> float | None:
    """The value, or None where it is undefined (nan)."""
    return value if np.isfinite(value) else None


def ranking(imagined: np.ndarray, real: np.ndarray, outcomes: np.ndarray) -> dict:
    """Group size, success rates, advantage correlation and pair accuracy of one imagination (ranked by ``imagined``,
    its 0/1 verdicts ``outcomes``) and its replays."""
    same, opposite = pair_counts(imagined, real)
    return {
        "group_size": imagined.shape[1],
        "imagined_success": float(outcomes.mean()),
        "real_success": float(real.mean()),
        "advantage_correlation": finite_or_none(advantage_correlation(imagined, real)),
        "normalized_advantage_correlation": finite_or_none(advantage_correlation(imagined, real, normalized=True)),
        "pairs": {"same_order": same, "opposite_order": opposite},
        "pair_accuracy": same / (same + opposite) if same + opposite else None,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--replays", nargs="+", required=True, help="from_recorded.py --imagined JSON, one per draw")
    parser.add_argument("--out", required=True, help="the JSON to write")
    parser.add_argument("--against", nargs="+", help="another imagination's replays over the same starts, to compare")
    parser.add_argument("--scores", help="the imagination's npz (imagine.py), to rank groups by a graded score")
    parser.add_argument("--score", default="peak_probability", help="which of the npz's per-episode scores")
    parser.add_argument("--bootstrap", type=int, default=2000, help="bootstrap rounds over starts")
    parser.add_argument("--seed", type=int, default=0, help="the bootstrap's seed")
    args = parser.parse_args(argv)
    for option in ("replays", "against"):
        paths = getattr(args, option)
        if paths is not None and len(paths) < 2:
            parser.error(f"a group needs at least 2 draws, got {len(paths)} --{option} file")
    reports = read_reports(args.replays)
    outcomes, real, files = load_groups(args.replays, reports)
    imagined = outcomes if args.scores is None else load_scores(args.scores, args.score, args.replays, reports)
    if args.against:
        imagined_other, real_other, files_other = load_groups(args.against, read_reports(args.against))
        if files_other != files:
            raise SystemExit(f"--against replays other starts than --replays (expected the same {len(files)} files)")
    signal_imagined = imagined.std(axis=1) > 0
    signal_real = real.std(axis=1) > 0
    report = {
        "replays": [Path(path).name for path in args.replays],
        "starts": len(files),
        "score": "imagined outcome" if args.scores is None else args.score,
        **ranking(imagined, real, outcomes),
        "mean_score": float(imagined.mean()),
        "agreement": success_agreement(outcomes.ravel() > 0, real.ravel() > 0).to_dict(),
        "groups_with_signal": {
            "imagined": wilson_rate(int(signal_imagined.sum()), len(files)),
            "real": wilson_rate(int(signal_real.sum()), len(files)),
            "both": wilson_rate(int((signal_imagined & signal_real).sum()), len(files)),
            "imagined_only": wilson_rate(int((signal_imagined & ~signal_real).sum()), len(files)),
        },
        "bootstrap_95": bootstrap(imagined, real, args.bootstrap, args.seed),
        "per_start": [
            {
                "file": name,
                "imagined": row_i.tolist() if args.scores else row_i.astype(int).tolist(),
                "real": row_r.astype(int).tolist(),
            }
            for name, row_i, row_r in zip(files, imagined, real, strict=True)
        ],
    }
    if args.against:
        difference = advantage_correlation(imagined, real) - advantage_correlation(imagined_other, real_other)
        report["against"] = {
            "replays": [Path(path).name for path in args.against],
            **ranking(imagined_other, real_other, imagined_other),
            "correlation_difference": finite_or_none(difference),
            "correlation_difference_95": correlation_difference(
                (imagined, real), (imagined_other, real_other), args.bootstrap, args.seed
            ),
        }
    Path(args.out).write_text(json.dumps(report, indent=1, allow_nan=False))
    print(json.dumps({key: value for key, value in report.items() if key != "per_start"}, indent=1))


if __name__ == "__main__":
    main()
