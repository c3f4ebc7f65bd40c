"""plots.py: importing it changes no plotting state; names with `$` show literally per text object, while
numeric tick formatters keep their mathtext (no raw TeX on a log axis); the random-weights tag follows sources."""
import subprocess
import sys

import matplotlib
import numpy as np
import pandas as pd
import pytest

matplotlib.use("Agg")  # this test process only: the library itself never switches backends

from fiseclip_lib.notebook import plots  # noqa: E402
from fiseclip_lib.notebook.report_checks import _TEX  # noqa: E402


def test_importing_plots_changes_no_rcparams():
    code = ("import matplotlib, json\nbefore = {k: repr(v) for k, v in matplotlib.rcParams.items()}\n"
            "backend = matplotlib.get_backend()\n"
            "from fiseclip_lib.notebook import plots, workbench\n"
            "after = {k: repr(v) for k, v in matplotlib.rcParams.items()}\n"
            "print(json.dumps([k for k in before if before[k] != after[k]]), backend == matplotlib.get_backend())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={"MPLBACKEND": "Agg", "PATH": ""}).stdout.split()
    assert out == ["[]", "True"]


def shown(fig):
    return {t["text"]: t["math"] for t in plots.figure_texts(fig)}


def test_names_with_dollars_show_literally_and_log_ticks_stay_math():
    df = pd.DataFrame({"N": [2, 4, 8, 16] * 2, "auroc": [0.5, 0.6, 0.7, 0.7, 0.4, 0.5, 0.6, 0.6],
                       "method": ["cost $x$"] * 4 + ["plain"] * 4})
    fig = plots.line_metrics(df, "N", "auroc", hue="method", title="title $a$", logx=True)
    texts = shown(fig)
    assert texts["title $a$"] is False and texts["cost $x$"] is False  # names: literal, not typeset
    logs = [t for t, math in texts.items() if "mathdefault" in t]
    assert logs and all(texts[t] for t in logs)  # the log axis' labels are typeset (2^2), not raw TeX
    assert not [t for t, math in texts.items() if not math and _TEX.search(t)]
    assert matplotlib.rcParams["text.parse_math"] is True


def test_category_tick_labels_from_names_show_literally():
    df = pd.DataFrame({"category": ["cost$1$", "plain"], "auroc": [0.5, 0.6]})
    texts = shown(plots.bar_metrics(df, "category", "auroc", title="t"))
    assert texts.get("cost$1$") is False and "plain" in texts
    from PIL import Image

    maps = plots.show_maps([Image.new("RGB", (8, 8))], np.zeros((1, 8, 8)), titles=["a$b$c"], suptitle="s$1$")
    texts = shown(maps)
    assert texts["a$b$c"] is False and texts["s$1$"] is False


def test_the_raw_tex_a_global_switch_made_is_what_the_check_sees():
    """The fault of issue 21: parse_math off for every text leaves a log axis with raw `$\\mathdefault{...}$`."""
    df = pd.DataFrame({"N": [2, 4, 8], "y": [1.0, 2.0, 3.0]})
    with matplotlib.rc_context({"text.parse_math": False}):
        fig = plots.line_metrics(df, "N", "y", logx=True)
        leaks = [t["text"] for t in plots.figure_texts(fig) if not t["math"] and _TEX.search(t["text"])]
    assert leaks and all("mathdefault" in t for t in leaks)


def test_weights_mark_follows_every_source():
    class Enc:
        def __init__(self, pretrained):
            self.pretrained = pretrained

    assert plots.weights_mark(True) == "" and plots.weights_mark(False) == plots.RANDOM_MARK  # the old form
    assert plots.weights_mark(Enc(True), "SIMULATED text map") == ""
    assert plots.weights_mark(Enc(True), Enc(False)) == plots.RANDOM_MARK
    assert plots.weights_mark({"kind": "CNN", "pretrained": False}) == plots.RANDOM_MARK
    assert plots.weights_mark({"kind": "simulated", "pretrained": None}) == ""
    assert plots.weights_mark() == ""


@pytest.mark.parametrize("name", ["a$b", "$x$", "100$ and 5$", "\\$"])
def test_tex_escape_shows_the_name_under_mathtext(name):
    from matplotlib.text import Text

    t = Text(text=plots.tex_escape(name))
    assert t._preprocess_math(t.get_text()) == (name, False)
