"""Confidence intervals of rates measured on few episodes (success rates, agreement and false-success rates)."""

from __future__ import annotations

import math

__all__ = ["Z_95", "mcnemar_exact", "wilson_interval", "wilson_rate"]

Z_95 = 1.959963984540054  # the standard normal quantile of 0.975


def wilson_interval(successes: int, trials: int, z: float = Z_95) -> tuple[float, float]:
    """The Wilson score interval of a success rate (95% for the default z).

    Args:
        successes: number of successes, in [0, trials].
        trials: number of trials, positive.

    Returns:
        (low, high) within [0, 1].
    """
    if trials < 1 or not 0 <= successes <= trials:
        raise ValueError(f"need 0 <= successes <= trials and trials >= 1, got {successes} of {trials}")
    p = successes / trials
    denominator = 1 + z**2 / trials
    centre = (p + z**2 / (2 * trials)) / denominator
    half = z * math.sqrt(p * (1 - p) / trials + z**2 / (4 * trials**2)) / denominator
    # At 0 and at `trials` successes the bound is exactly 0 or 1; rounding leaves about 1e-17 there.
    low = 0.0 if successes == 0 else max(0.0, centre - half)
    high = 1.0 if successes == trials else min(1.0, centre + half)
    return low, high


def wilson_rate(count: int, of: int) -> dict[str, float] | None:
    """`{"rate", "ci_low", "ci_high", "count", "of"}` of `count` in `of` trials (95% Wilson); None if `of` is 0."""
    if of == 0:
        return None
    low, high = wilson_interval(count, of)
    return {"rate": count / of, "ci_low": low, "ci_high": high, "count": count, "of": of}


def mcnemar_exact(gained: int, lost: int) -> float:
    """The two-sided exact McNemar p-value of a paired comparison on the same starts.

    Only the starts where the two policies differ count: under no difference, each of those `gained + lost` starts
    is a gain or a loss with probability 1/2, and the p-value is twice the binomial tail of the smaller count
    (at most 1).

    Args:
        gained: starts the second policy solves and the first does not, >= 0.
        lost: starts the first policy solves and the second does not, >= 0.
    """
    if isinstance(gained, bool) or isinstance(lost, bool) or not isinstance(gained, int) or not isinstance(lost, int):
        raise ValueError(f"gained and lost must be counts (ints), got {gained!r} and {lost!r}")
    if gained < 0 or lost < 0:
        raise ValueError(f"gained and lost must be >= 0, got {gained} and {lost}")
    n = gained + lost
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, k) for k in range(min(gained, lost) + 1)) / 2**n
    return min(1.0, 2 * tail)
