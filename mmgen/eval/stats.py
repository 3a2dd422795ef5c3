"""Confidence intervals for the numbers a report shows.

A proportion (k of n samples judged correct) gets the Wilson score interval, which stays inside
[0, 1] and keeps its coverage near 95% at small n and near 0 or 1, where the normal (Wald) interval
fails. A difference of two independent proportions (``mmgen eval compare``) gets Newcombe's hybrid
score interval (method 10 of Newcombe 1998), built from the two Wilson intervals. A mean of a
continuous measure (PSNR) gets the normal interval of the mean.
"""

from __future__ import annotations

import math

Z95 = 1.959963984540054  # the 0.975 quantile of the standard normal


def wilson(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of the proportion ``k / n``; (0, 1) when ``n`` is 0."""
    if n <= 0:
        return (0.0, 1.0)
    if not 0 <= k <= n:
        raise ValueError(f"k must be in [0, n], got k={k}, n={n}")
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    # at k = 0 or k = n the bound is exactly 0 or 1; rounding would leave 1e-17 there
    return (0.0 if k == 0 else max(0.0, centre - half), 1.0 if k == n else min(1.0, centre + half))


def proportion(k: int, n: int) -> dict:
    """A proportion as a report states it: value, the counts behind it and its 95% interval."""
    lo, hi = wilson(int(k), int(n))
    return {"value": k / n if n else None, "k": int(k), "n": int(n), "ci95": [lo, hi]}


def mean_interval(values) -> dict:
    """Mean of a continuous measure with its 95% normal interval (sample standard deviation)."""
    xs = [float(v) for v in values]
    n = len(xs)
    if n == 0:
        return {"value": None, "n": 0, "ci95": [None, None]}
    m = sum(xs) / n
    sd = math.sqrt(sum((x - m) ** 2 for x in xs) / (n - 1)) if n > 1 else 0.0
    half = Z95 * sd / math.sqrt(n)
    return {"value": m, "n": n, "ci95": [m - half, m + half]}


def difference(a: dict, b: dict) -> dict:
    """``b - a`` for two proportions (dicts of :func:`proportion`), with Newcombe's 95% interval;
    ``significant`` when the interval excludes 0."""
    p1, p2 = a["k"] / a["n"], b["k"] / b["n"]
    l1, u1 = wilson(a["k"], a["n"])
    l2, u2 = wilson(b["k"], b["n"])
    d = p2 - p1
    lo = d - math.sqrt((p2 - l2) ** 2 + (u1 - p1) ** 2)
    hi = d + math.sqrt((u2 - p2) ** 2 + (p1 - l1) ** 2)
    return {"value": d, "ci95": [lo, hi], "significant": lo > 0 or hi < 0}
