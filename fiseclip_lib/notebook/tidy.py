"""`python -m fiseclip_lib.notebook.tidy notebooks/*.ipynb`: the tracked form of a notebook, so that opening
and running it in JupyterLab leaves no diff worth committing (run it before committing; `--check` only reports).

The tracked form: no outputs, no execution counts, cell metadata reduced to `tags` (papermill's `parameters`
tag), and notebook metadata pinned to

    {"kernelspec": {"display_name": "Python 3 (ipykernel)", "language": "python", "name": "python3"},
     "language_info": {"name": "python"}}

The kernelspec is exactly what JupyterLab writes for the venv's ipykernel, so opening a notebook does not
rewrite it. `language_info` cannot be pinned that way (JupyterLab fills in the running Python's version, which
differs per machine): it is kept to its name, which GitHub and nbconvert use to highlight the code, and tidy
puts it back. `tests/test_report.py` checks that every tracked notebook is in this form.
"""
from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

LAB_KERNELSPEC = {"display_name": "Python 3 (ipykernel)", "language": "python", "name": "python3"}
TRACKED_METADATA = {"kernelspec": LAB_KERNELSPEC, "language_info": {"name": "python"}}
CELL_METADATA_KEPT = ("tags",)


def tidy_notebook(nb):
    """The tracked form of a notebook (a copy; see the module docstring).

    Args:
        nb: an nbformat notebook node.
    Returns:
        The tidied copy.
    """
    nb = copy.deepcopy(nb)
    nb.metadata = copy.deepcopy(TRACKED_METADATA)
    for cell in nb.cells:
        cell.metadata = {k: v for k, v in cell.get("metadata", {}).items() if k in CELL_METADATA_KEPT}
        if cell.cell_type == "code":
            cell.outputs = []
            cell.execution_count = None
    return nb


def untidy(nb) -> list[str]:
    """What differs from the tracked form, one phrase each (empty: tidy).

    Args:
        nb: an nbformat notebook node.
    Returns:
        Phrases such as "metadata {...}", "3 cells with outputs".
    """
    found = []
    if dict(nb.metadata) != TRACKED_METADATA:
        found.append(f"metadata {dict(nb.metadata)} (want {TRACKED_METADATA})")
    code = [c for c in nb.cells if c.cell_type == "code"]
    for what, bad in (("with outputs", [c for c in code if c.get("outputs")]),
                      ("with execution counts", [c for c in code if c.get("execution_count") is not None]),
                      ("with metadata other than tags",
                       [c for c in nb.cells if set(c.get("metadata", {})) - set(CELL_METADATA_KEPT)])):
        if bad:
            found.append(f"{len(bad)} cell(s) {what}")
    return found


def main(argv=None) -> int:
    """Tidy the named notebooks in place (atomically; an unchanged file is not rewritten), or with `--check`
    list the untidy ones and exit 1. Returns the exit status."""
    import nbformat

    from fiseclip_lib.errors import FiseclipError
    from fiseclip_lib.plumbing.files import write_text_atomic

    p = argparse.ArgumentParser(prog="python -m fiseclip_lib.notebook.tidy", description=__doc__.splitlines()[0])
    p.add_argument("notebooks", nargs="+", type=Path)
    p.add_argument("--check", action="store_true", help="only report notebooks that are not tidy (exit 1)")
    args = p.parse_args(argv)
    status = 0
    for path in args.notebooks:
        try:
            nb = nbformat.read(str(path), as_version=4)
        except Exception as e:  # noqa: BLE001 - not JSON, not a notebook, unreadable
            raise FiseclipError(f"{path}: not a readable notebook ({type(e).__name__}); fix or leave it out") from None
        problems = untidy(nb)
        if not problems:
            continue
        if args.check:
            print(f"{path}: not tidy: {'; '.join(problems)}")
            status = 1
            continue
        write_text_atomic(path, nbformat.writes(tidy_notebook(nb)) + "\n")
        print(f"{path}: tidied ({'; '.join(problems)})")
    return status


if __name__ == "__main__":
    from fiseclip_lib.errors import FiseclipError

    try:
        sys.exit(main())
    except FiseclipError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
