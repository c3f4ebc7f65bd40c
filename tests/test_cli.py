import pytest
import json
import subprocess
import sys

import pandas as pd

from fiseclip_lib.cli import main


def tiny_args(root, out, *extra):
    return ["run", "--dataset", "demo", "--root", str(root), "--model", "fiseclip-tiny", "--pretrained", "none",
            "--image-size", "112", "--batch-size", "5", "--out", str(out), "--no-progress", *extra]


def test_run_cli_writes_named_outputs(small_demo, tmp_path, capsys):
    assert main(tiny_args(small_demo, tmp_path / "o", "--categories", "textile", "--set", "filter_theta=0.4",
                          "--save-maps")) == 0
    out = tmp_path / "o"
    m = pd.read_csv(out / "metrics.csv")
    assert list(m.category) == ["textile", "mean"]
    for col in ["image_auroc", "image_ap", "image_f1_max", "pixel_auroc", "pixel_ap", "pixel_f1_max", "pixel_aupro",
                "method", "encoder", "pretrained"]:
        assert col in m.columns
    assert json.loads((out / "config.json").read_text())["config"]["filter_theta"] == 0.4
    assert (out / "maps" / "textile.npz").is_file()
    assert "RANDOM WEIGHTS" in capsys.readouterr().out


def test_params_file_reaches_the_config(small_demo, tmp_path):
    params = tmp_path / "p.yaml"
    params.write_text(f"dataset: demo\nroot: {small_demo}\nmodel: fiseclip-tiny\npretrained: none\nimage_size: 112\n"
                      f"batch_size: 5\nrestore: naclip\ncategories: brick\n")
    assert main(["run", "--params", str(params), "--out", str(tmp_path / "o"), "--no-progress"]) == 0
    conf = json.loads((tmp_path / "o" / "config.json").read_text())
    assert conf["config"]["restore"] == "naclip" and conf["categories"] == ["brick"]


def test_bad_input_is_one_line_error(tmp_path, capsys):
    code = main(["run", "--dataset", "mvtec", "--root", str(tmp_path / "missing"), "--model", "fiseclip-tiny",
                 "--pretrained", "none", "--image-size", "112", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.startswith("fiseclip: error:") and "missing" in err and "\n" not in err
    code = main(tiny_args(tmp_path, tmp_path / "o", "--set", "restore=bogus"))
    assert code == 2 and "unknown restore" in capsys.readouterr().err


def test_resume_reuses_finished_categories(small_demo, tmp_path, capsys):
    out = tmp_path / "o"
    assert main(tiny_args(small_demo, out)) == 0
    first = (out / "metrics.csv").read_bytes()
    (out / "metrics.csv").unlink()
    assert main(tiny_args(small_demo, out, "--resume")) == 0
    assert "reused finished result" in capsys.readouterr().out
    assert (out / "metrics.csv").read_bytes() == first


@pytest.mark.slow
def test_module_entry_point_runs():
    r = subprocess.run([sys.executable, "-m", "fiseclip_lib", "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "demo-data" in r.stdout and "run" in r.stdout


def test_ctrl_c_says_what_each_command_keeps(monkeypatch, tmp_path, capsys):
    import fiseclip_lib.cli as C

    def interrupted(args):
        raise KeyboardInterrupt

    for name in ("cmd_run", "cmd_sweep", "cmd_report", "cmd_demo_data"):
        monkeypatch.setattr(C, name, interrupted)
    said = {}
    for argv in (["run", "--dataset", "demo", "--root", str(tmp_path), "--out", str(tmp_path / "o")],
                 ["sweep", str(tmp_path / "g.yaml"), "--out", str(tmp_path / "s")],
                 ["report", "--out", str(tmp_path / "r")], ["demo-data", "--out", str(tmp_path / "d")]):
        assert main(argv) == 130
        said[argv[0]] = capsys.readouterr().err.strip()
    assert said == {"run": "fiseclip: interrupted; finished categories are kept (rerun with --resume)",
                    "sweep": "fiseclip: interrupted; finished tasks are kept (rerun with --resume)",
                    "report": "fiseclip: interrupted; finished reports are kept (rerun the others with --only)",
                    "demo-data": "fiseclip: interrupted"}


def test_empty_categories_mean_all_and_dataset_kinds_are_defined_once(tmp_path, monkeypatch, capsys):
    """`categories: ""` / `[]` mean every category (as in `fiseclip sweep`, one parser: data.parse_categories);
    an explicit `--categories ""` means all too, over the params file's list. The dataset kinds are
    data.DATASETS, for the --dataset choices and the params file check alike."""
    import fiseclip_lib.evaluation.run as R
    from fiseclip_lib.cli import build_parser
    from fiseclip_lib.evaluation.data import DATASETS

    asked = []

    def fake_run(dataset, root, config, out, categories=None, **kw):
        asked.append(categories)
        return pd.DataFrame({"pretrained": [False]})

    monkeypatch.setattr(R, "run_benchmark", fake_run)
    monkeypatch.setattr(R, "format_table", lambda df: "")
    params = tmp_path / "p.yaml"
    base = f"dataset: demo\nroot: {tmp_path}\nmodel: fiseclip-tiny\npretrained: none\n"
    for value in ('""', "[]", "' , '", "['', ' ']"):
        params.write_text(base + f"categories: {value}\n")
        assert main(["run", "--params", str(params), "--out", str(tmp_path / "o"), "--no-progress"]) == 0, value
    assert asked == [None] * 4
    params.write_text(base + "categories: brick\n")
    for flag, expected in (([], ["brick"]), (["--categories", ""], None), (["--categories", " textile, "], ["textile"])):
        asked.clear()
        assert main(["run", "--params", str(params), "--out", str(tmp_path / "o"), "--no-progress", *flag]) == 0
        assert asked == [expected], flag
    capsys.readouterr()
    # one list of dataset kinds
    run = next(a for a in build_parser()._subparsers._group_actions[0].choices["run"]._actions
               if a.dest == "dataset")
    assert run.choices is None and all(d in run.help for d in DATASETS)  # anomalib:<name> is checked by name
    params.write_text(base.replace("dataset: demo", "dataset: kolektor"))
    assert main(["run", "--params", str(params), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"fiseclip: error: params file {params}: unknown dataset 'kolektor' (anomalib's: anomalib:kolektor); "
                   f"use mvtec, visa, folder, metajson, demo or anomalib:<name> (btech, kolektor, mpdd, mvtec_loco, "
                   f"mvtecad, mvtecad2, realiad, visa)")
