"""Student's t and Holm's correction: what a leaderboard needs to call a difference over a few seeds
significant, exactly at any sample size (scipy.stats.t's two functions, without the dependency).
"""

from __future__ import annotations

import math

LEVEL = 0.95  # the intervals' coverage; 1 - LEVEL is the test's size


def t_p_value(t: float, df: int) -> float:
    """Two-sided P(|T| >= |t|) for Student's t with `df` (a whole number >= 1) degrees of freedom, exactly:
    Abramowitz & Stegun 26.7.3 (odd df) and 26.7.4 (even df), finite sums in cos(theta),
    theta = atan(|t| / sqrt(df)). (scipy.stats.t without the dependency.)"""
    theta = math.atan(abs(t) / math.sqrt(df))
    s, c = math.sin(theta), math.cos(theta)
    if df % 2:  # A = (2/pi) (theta + sin (cos + 2/3 cos^3 + ... + 2*4..(df-3) / (1*3..(df-2)) cos^(df-2)))
        total, term = 0.0, c
        for k in range(1, (df - 1) // 2 + 1):
            total += term
            term *= c * c * (2 * k) / (2 * k + 1)
        inside = 2 / math.pi * (theta + s * total)
    else:  # A = sin (1 + 1/2 cos^2 + 1*3/(2*4) cos^4 + ... + 1*3..(df-3) / (2*4..(df-2)) cos^(df-2))
        total, term = 0.0, 1.0
        for k in range(1, df // 2 + 1):
            total += term
            term *= c * c * (2 * k - 1) / (2 * k)
        inside = s * total
    return max(0.0, 1.0 - inside)


def t_quantile(df: int, level: float = LEVEL) -> float:
    """q with P(|T| <= q) = level for Student's t with `df` degrees of freedom (4.3027 for df 2 at 95%),
    by bisection on the exact tail `t_p_value`."""
    lo, hi = 0.0, 1.0
    while t_p_value(hi, df) > 1 - level:
        lo, hi = hi, hi * 2
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if t_p_value(mid, df) > 1 - level else (lo, mid)
        if hi - lo < 1e-12 * hi:
            break
    return (lo + hi) / 2


def holm(p_values: list[float | None]) -> list[float | None]:
    """Holm's step-down adjusted p-values (None stays None and is not counted): p(i), the i-th smallest of m,
    becomes max over j <= i of min(1, (m - j + 1) p(j)); a difference is significant where it is < 1 - LEVEL."""
    order = sorted((p, i) for i, p in enumerate(p_values) if p is not None)
    m, running, out = len(order), 0.0, [None] * len(p_values)
    for j, (p, i) in enumerate(order):
        running = max(running, min(1.0, (m - j) * p))
        out[i] = running
    return out
