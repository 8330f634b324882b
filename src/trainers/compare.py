"""Paired comparison of two evaluations on the same starts (`opensora-gym compare-evals BASE OTHER`).

Two policies evaluated on the same task x trial starts (`opensora-gym eval`, its `eval_results.json`) differ on some
starts only; the exact McNemar test asks whether the starts the second policy gains outnumber the ones it loses by
more than chance. Each policy's success rate gets its 95% Wilson interval.

opensora-gym compare-evals runs/base/eval/policy/eval_results.json runs/grpo/eval/policy/eval_results.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from opensora_gym.audit import success_agreement
from opensora_gym.intervals import mcnemar_exact, wilson_interval

__all__ = ["add_command", "compare_evaluations", "load_outcomes", "markdown"]


def load_outcomes(path: str | Path) -> dict[tuple, bool]:
    """The success of each start of an `eval_results.json`, keyed by its episode (e.g. task and trial ids).

    Raises:
        ValueError: the file is not an evaluation's results, or names a start twice.
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        outcomes = data["outcomes"]
        pairs = [(tuple(sorted(outcome["episode"].items())), bool(outcome["success"])) for outcome in outcomes]
    except (OSError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as error:
        raise ValueError(
            f"{path}: expected an evaluation's eval_results.json with outcomes [{{episode, success}}, ...], "
            f"could not read it ({type(error).__name__}: {error})"
        ) from error
    result = dict(pairs)
    if len(result) != len(pairs) or not result:
        raise ValueError(
            f"{path}: expected each start once and at least one, got {len(pairs)} outcomes for {len(result)} starts"
        )
    return result


def compare_evaluations(base: dict[tuple, bool], other: dict[tuple, bool]) -> dict:
    """Success rates (95% Wilson), the starts gained and lost by `other` against `base`, and the exact McNemar p.

    Raises:
        ValueError: the two evaluations did not run the same starts.
    """
    if base.keys() != other.keys():
        raise ValueError(
            f"expected the same starts in both evaluations, got {len(base)} and {len(other)} with "
            f"{len(base.keys() & other.keys())} in common"
        )
    starts = list(base)
    # The audit's paired count, `other` in the world model's place: its false successes are the starts `other` gains,
    # its missed successes the ones it loses.
    counts = success_agreement([other[start] for start in starts], [base[start] for start in starts])
    n = len(starts)

    def rate(outcomes: dict[tuple, bool]) -> dict:
        successes = sum(outcomes.values())
        low, high = wilson_interval(successes, n)
        return {"successes": successes, "rate": successes / n, "ci_low": low, "ci_high": high}

    return {
        "starts": n,
        "base": rate(base),
        "other": rate(other),
        "both": counts.both_success,
        "neither": counts.both_failure,
        "gained": counts.false_success,
        "lost": counts.missed_success,
        "difference": (counts.false_success - counts.missed_success) / n,
        "mcnemar_p": mcnemar_exact(counts.false_success, counts.missed_success),
    }


def markdown(comparison: dict, names: tuple[str, str] = ("base", "other")) -> str:
    """The comparison as a markdown table."""
    n = comparison["starts"]
    lines = [
        f"| policy | success of {n} starts | 95% Wilson |",
        "|---|---|---|",
    ]
    for name, key in zip(names, ("base", "other"), strict=True):
        rate = comparison[key]
        lines.append(
            f"| {name} | {rate['successes']} ({100 * rate['rate']:.1f}%) | "
            f"[{100 * rate['ci_low']:.1f}%, {100 * rate['ci_high']:.1f}%] |"
        )
    lines.append("")
    lines.append(
        f"paired: {comparison['gained']} gained, {comparison['lost']} lost, {comparison['both']} both, "
        f"{comparison['neither']} neither; difference {100 * comparison['difference']:+.1f} points, "
        f"exact McNemar p = {comparison['mcnemar_p']:.3g}"
    )
    return "\n".join(lines)


def run(args: argparse.Namespace) -> dict:
    comparison = compare_evaluations(load_outcomes(args.base), load_outcomes(args.other))
    print(markdown(comparison, (str(args.base), str(args.other))))
    if args.out is not None:
        Path(args.out).write_text(json.dumps(comparison, indent=2) + "\n", encoding="utf-8")
    return comparison


def add_command(commands) -> None:
    """Adds `compare-evals` to the `opensora-gym` subcommands."""
    parser = commands.add_parser("compare-evals", help="paired comparison of two evaluations on the same starts")
    parser.add_argument("base", type=Path, help="eval_results.json of the base policy")
    parser.add_argument("other", type=Path, help="eval_results.json of the policy compared with it")
    parser.add_argument("--out", type=Path, help="also write the comparison as JSON here")
