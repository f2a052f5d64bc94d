"""The promotion gate: may a new model version take the alias?

Pure logic, so it is easy to reason about and test:

1. the quality stage of its training data passed (when required);
2. it beats the naive baseline on the gate metric;
3. it beats the current alias holder, measured on the same test split, by the relative margin.

Example:
    >>> decide({"rmse": 9.0}, {"rmse": 12.0}, {"rmse": 10.0}, "rmse", False, 0.05, True)
    (True, ['rmse 9 beats the baseline 12', 'rmse 9 beats the champion 10 by 10.0% (>= 5.0%)'])
"""

from __future__ import annotations

import math
from typing import Any

__all__ = ["decide", "improvement"]


def improvement(new: float, old: float, higher_is_better: bool) -> float:
    """Relative improvement of ``new`` over ``old`` (positive = better)."""
    if old == 0:
        return math.inf if (new > old) == higher_is_better and new != old else 0.0
    delta = (new - old) if higher_is_better else (old - new)
    return delta / abs(old)


def _g(v: float) -> str:
    return f"{v:.6g}"


def decide(
    metrics: dict[str, Any],
    baseline: dict[str, Any],
    champion: dict[str, Any] | None,
    metric: str,
    higher_is_better: bool,
    min_improvement: float,
    quality_passed: bool | None,
    require_quality_passed: bool = True,
) -> tuple[bool, list[str]]:
    """Whether to promote, and the reasons (every check, passed or not, in order).

    Args:
        metrics: The candidate's test metrics.
        baseline: The naive baseline's metrics on the same split.
        champion: The current holder's metrics on the same split (None: no holder).
        metric: The metric compared.
        higher_is_better: Its direction.
        min_improvement: Relative margin required over the champion.
        quality_passed: Verdict of the training data's quality stage (None: unknown).
        require_quality_passed: Whether that verdict must be "passed".
    """
    reasons: list[str] = []
    ok = True
    if require_quality_passed and quality_passed is not True:
        ok = False
        reasons.append(
            "the training data's quality stage "
            + ("failed" if quality_passed is False else "has no recorded verdict")
        )
    value = metrics.get(metric)
    if value is None or not math.isfinite(float(value)):
        return False, reasons + [f"the candidate has no finite {metric}"]
    b = baseline.get(metric)
    if b is not None and math.isfinite(float(b)):
        if improvement(float(value), float(b), higher_is_better) > 0:
            reasons.append(f"{metric} {_g(value)} beats the baseline {_g(b)}")
        else:
            ok = False
            reasons.append(f"{metric} {_g(value)} does not beat the baseline {_g(b)}")
    if champion is not None and champion.get(metric) is not None:
        c = float(champion[metric])
        imp = improvement(float(value), c, higher_is_better)
        if imp >= min_improvement and imp > 0:
            reasons.append(
                f"{metric} {_g(value)} beats the champion {_g(c)} by {imp:.1%} "
                f"(>= {min_improvement:.1%})"
            )
        else:
            ok = False
            reasons.append(
                f"{metric} {_g(value)} vs the champion {_g(c)}: {imp:+.1%}, "
                f"needs at least {min_improvement:.1%}"
            )
    elif champion is None:
        reasons.append("there is no current champion")
    return ok, reasons
