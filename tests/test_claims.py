"""claims.py: each sentence follows its numbers, and `check_claim` catches a sentence its numbers contradict."""
import json

import numpy as np
import pytest

from fiseclip_lib.notebook import claims
from fiseclip_lib.notebook.claims import CLAIM_MIME, check_claim, compare, growth, near, plateau, state


def naive_slope(x, y):
    """Least-squares slope of log y on log x, written out (the reference for growth's classification)."""
    lx, ly = [np.log(v) for v in x], [np.log(v) for v in y]
    mx, my = sum(lx) / len(lx), sum(ly) / len(ly)
    return sum((a - mx) * (b - my) for a, b in zip(lx, ly)) / sum((a - mx) ** 2 for a in lx)


@pytest.mark.parametrize("power, word", [(0.5, "sublinearly"), (1.0, "about linearly"), (2.0, "faster than linearly")])
def test_growth_names_the_slope_of_its_numbers(power, word):
    x = [1, 2, 4, 8, 16]
    y = [v ** power for v in x]
    text = growth(x, y, what="time", of="N")
    assert f"grows {word}" in text and f"{naive_slope(x, y):.2f}" in text
    for other in {"sublinearly", "about linearly", "faster than linearly"} - {word}:
        assert f"grows {other}" not in text


def test_growth_on_flat_or_falling_data_never_says_linearly():
    x = [1, 2, 4, 8]
    flat = growth(x, [3.0, 3.02, 2.99, 3.01], what="time")
    assert "stays flat" in flat and "linearly" not in flat
    falling = growth(x, [8.0, 4.0, 2.0, 1.0], what="time")
    assert "falls" in falling and "linearly" not in falling
    assert "too few" in growth([1], [2.0]) and "too few" in growth([1, 2], [0.0, 1.0])


def test_plateau_finds_where_gains_stop_and_says_when_there_is_none():
    x = [1, 2, 4, 8, 16]
    text = plateau(x, [0.50, 0.60, 0.70, 0.705, 0.706], what="AUROC", of="N", tol=0.01)
    assert "flattens from N = 4" in text
    rising = plateau(x, [0.5, 0.6, 0.7, 0.8, 0.9], what="AUROC", of="N", tol=0.01)
    assert "keeps rising" in rising and "flattens" not in rising
    # unsorted input: the same answer (sorted by x)
    assert plateau(x[::-1], [0.706, 0.705, 0.70, 0.60, 0.50], what="AUROC", of="N", tol=0.01) == text


def test_near_and_compare_follow_their_numbers():
    assert "sit near 0.5" in near([0.48, 0.52, 0.5], 0.5, 0.05, what="RANDOM rows")
    far = near([0.48, 0.9], 0.5, 0.05, what="RANDOM rows")
    assert "do not all sit near" in far and "1 of 2" in far
    assert "give the same" in compare(0.8, 0.8, "fiseclip", "fiseclip-nofilter", "AUROC")
    assert compare(0.7, 0.8, "a", "b").startswith("b gives a higher")
    assert compare(0.7, 0.8, "a", "b", higher_is_better=False).startswith("a gives a lower")


def test_check_claim_accepts_a_recorded_claim_and_rejects_a_contradicted_one():
    rec = json.loads(json.dumps(state("growth", x=np.array([1, 2, 4]), y=[1.0, 2.0, 4.1], what="cost")))
    assert check_claim(rec) is None  # a JSON round trip keeps it valid
    # the sentence written against the numbers: flat data said to grow linearly
    flat = state("growth", x=[1, 2, 4], y=[1.0, 1.0, 1.0], what="cost")
    lie = {**flat, "text": rec["text"]}
    assert "but its numbers say" in check_claim(lie) and "stays flat" in check_claim(lie)
    assert "unknown claim kind" in check_claim({"kind": "vibes", "numbers": {}, "text": "x"})
    assert "non-finite" in check_claim({**flat, "numbers": {**flat["numbers"], "flat": float("nan")}})
    assert "cannot be re-derived" in check_claim({**flat, "numbers": {"nonsense": 1}})
    with pytest.raises(ValueError, match="unknown claim kind"):
        state("vibes")


def test_every_claim_kind_is_documented_and_its_record_round_trips():
    examples = {"growth": dict(x=[1, 2], y=[1.0, 2.0]), "plateau": dict(x=[1, 2, 3], y=[0.1, 0.2, 0.2]),
                "near": dict(values=[0.5], target=0.5, tol=0.1), "compare": dict(a=1.0, b=2.0, name_a="a", name_b="b")}
    assert set(examples) == set(claims.CLAIMS)
    for kind, numbers in examples.items():
        assert claims.CLAIMS[kind].__doc__
        assert check_claim(json.loads(json.dumps(state(kind, **numbers)))) is None
    assert CLAIM_MIME.startswith("application/vnd.fiseclip.")
