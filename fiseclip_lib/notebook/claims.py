"""Sentences computed from numbers: what a notebook says about its results is never written against them.

A notebook that wants to say "cost grows about linearly" or "the RANDOM rows sit near 0.5" calls a function here
with the numbers of that run; the function returns the sentence the numbers support (which may be the opposite
of what the author expected). `workbench.claim` shows the sentence and records it (`CLAIM_MIME`) with its kind and
numbers, and `check_claim` re-derives the sentence from the recorded numbers: the report tests fail when a
notebook's stated claim differs from what its own numbers say (e.g. text edited by hand after the run).

Every function is pure: numbers in, one sentence out (plain text, no Markdown).

Example:
    >>> growth([1, 2, 4, 8], [1.0, 2.1, 3.9, 8.2], what="time per batch")
    'time per batch grows about linearly with the x value (log-log slope 1.00 from x = 1 to 8)'
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import numpy as np

CLAIM_MIME = "application/vnd.fiseclip.claim+json"


def _fmt(v: float) -> str:
    return f"{v:.3g}"


def growth(x: Sequence[float], y: Sequence[float], what: str = "cost", of: str = "the x value",
           flat: float = 0.05) -> str:
    """How y grows with x: flat, sublinearly, about linearly or faster, from the log-log slope of a least-squares
    fit (a slope of 1 is linear growth; within 0.8-1.2 counts as "about linearly").

    Args:
        x, y: positive values (e.g. batch sizes and seconds).
        what: the quantity's name; of: the x quantity's name.
        flat: a relative change of y below this over the whole x range counts as flat.
    Returns:
        One sentence.
    """
    x, y = np.asarray(x, float), np.asarray(y, float)
    if x.size < 2 or np.any(x <= 0) or np.any(y <= 0):
        return f"{what}: too few positive values to state a trend"
    slope = float(np.polyfit(np.log(x), np.log(y), 1)[0])
    span = f"(log-log slope {slope:.2f} from x = {_fmt(x.min())} to {_fmt(x.max())})"
    if abs(y.max() - y.min()) <= flat * max(abs(y.min()), 1e-12):
        return f"{what} stays flat as {of} grows {span}"
    if slope < 0:
        return f"{what} falls as {of} grows {span}"
    if slope < 0.8:
        kind = "sublinearly"
    elif slope <= 1.2:
        kind = "about linearly"
    else:
        kind = "faster than linearly"
    return f"{what} grows {kind} with {of} {span}"


def plateau(x: Sequence[float], y: Sequence[float], what: str = "the metric", of: str = "x", tol: float = 0.01) -> str:
    """Where y stops improving: the smallest x after which y never rises by more than `tol` (absolute).

    Returns:
        "flattens from x = ..." or "keeps rising up to x = ..." (one sentence).
    """
    x, y = np.asarray(x, float), np.asarray(y, float)
    order = np.argsort(x)
    x, y = x[order], y[order]
    for i in range(len(x)):
        if np.all(y[i:] <= y[i] + tol):
            if i == len(x) - 1:
                break
            return (f"{what} flattens from {of} = {_fmt(x[i])} (it gains at most {tol:g} beyond it: "
                    f"{_fmt(y[i])} -> {_fmt(y[-1])})")
    return f"{what} keeps rising up to {of} = {_fmt(x[-1])} ({_fmt(y[0])} -> {_fmt(y[-1])}), no plateau yet"


def near(values: Sequence[float], target: float, tol: float, what: str = "the values") -> str:
    """Whether every value lies within `tol` of `target` (e.g. AUROCs of random weights near chance, 0.5).

    Returns:
        One sentence naming the range of the values.
    """
    v = np.asarray(values, float)
    lo, hi = float(np.nanmin(v)), float(np.nanmax(v))
    if np.all(np.abs(v - target) <= tol):
        return f"{what} sit near {_fmt(target)} (all within {tol:g}: {_fmt(lo)} to {_fmt(hi)})"
    far = int(np.sum(np.abs(v - target) > tol))
    return f"{what} do not all sit near {_fmt(target)}: {far} of {v.size} lie farther than {tol:g} ({_fmt(lo)} to {_fmt(hi)})"


def compare(a: float, b: float, name_a: str, name_b: str, what: str = "", tol: float = 1e-6,
            higher_is_better: bool = True) -> str:
    """Which of two numbers is better, or that they are equal within `tol` (say why in the notebook then).

    Returns:
        One sentence with both numbers and the difference.
    """
    what = f" {what}" if what else ""
    if abs(a - b) <= tol:
        return f"{name_a} and {name_b} give the same{what} ({_fmt(a)}; difference {abs(a - b):.1g} <= {tol:g})"
    better, worse, bv, wv = (name_a, name_b, a, b) if (a > b) == higher_is_better else (name_b, name_a, b, a)
    word = "higher" if higher_is_better else "lower"
    return f"{better} gives a {word}{what} than {worse} ({_fmt(bv)} vs {_fmt(wv)}, difference {abs(a - b):.3g})"


CLAIMS: dict[str, Callable[..., str]] = {"growth": growth, "plateau": plateau, "near": near, "compare": compare}


def state(kind: str, **numbers) -> dict:
    """The claim record: {"kind", "numbers", "text"}; numbers are made JSON-able (lists of floats)."""
    if kind not in CLAIMS:
        raise ValueError(f"unknown claim kind {kind!r}; one of {', '.join(CLAIMS)}")
    clean = {k: (np.asarray(v, float).tolist() if isinstance(v, (list, tuple, np.ndarray)) else
                 float(v) if isinstance(v, (np.floating, np.integer)) else v) for k, v in numbers.items()}
    return {"kind": kind, "numbers": clean, "text": CLAIMS[kind](**clean)}


def check_claim(record: dict) -> str | None:
    """None when the recorded text is what the recorded numbers say; else a one-line description of the clash."""
    kind = record.get("kind")
    if kind not in CLAIMS:
        return f"unknown claim kind {kind!r}"
    numbers = record.get("numbers") or {}
    if any(isinstance(v, float) and not math.isfinite(v) for v in numbers.values()):
        return f"claim {record.get('text')!r} rests on a non-finite number"
    try:
        expected = CLAIMS[kind](**numbers)
    except (TypeError, ValueError) as e:  # numbers that do not fit the kind: a broken record, said in one line
        return f"claim {record.get('text')!r} cannot be re-derived from its numbers ({e})"
    if expected != record.get("text"):
        return f"stated {record.get('text')!r} but its numbers say {expected!r}"
    return None
