"""Execute assignment.ipynb against a finished run and save the executed copy.

    python scripts/execute_notebook.py RUN_DIR DEST.ipynb --profile quick --data-dir DATA
        [--weights results/full] [--note "what this copy shows"]

The copy is for reading without running anything (a code host shows its
outputs); the working notebook at the top level stays output-free. RUN_DIR
is written into as a rerun of the notebook would: checkpoints and caches whose
settings match are reused (copy a run with `cp -a` first: the caches key on
file times), anything missing is computed. With --weights the models are the
published ones and nothing is trained. --note goes into a box at the top of
the copy, e.g. which run and profile it shows.

Needs nbclient and ipykernel (requirements-test.txt).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def kernel_environment(jupyter: Path, *, profile: str, data_dir: Path, out_dir: Path) -> dict[str, str]:
    """Write a "python3" kernel spec for this very interpreter under `jupyter`
    and return the environment a kernel needs to run the notebook: that folder
    first on JUPYTER_PATH (so no other interpreter's "python3" kernel is
    picked up), the profile and folders the setup cell reads, this repository
    importable. tests/test_notebook.py executes the notebook the same way."""
    from ipykernel.kernelspec import write_kernel_spec

    write_kernel_spec(Path(jupyter) / "kernels" / "python3")
    return {"JUPYTER_PATH": str(jupyter), "CNNSTRESS_PROFILE": profile,
            "CNNSTRESS_DATA_DIR": str(Path(data_dir).resolve()), "CNNSTRESS_OUT_DIR": str(Path(out_dir).resolve()),
            "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)}


def execute(nb, *, timeout: int | None = None):
    """Run every cell of `nb` in the "python3" kernel, from the repository root; returns nb."""
    from nbclient import NotebookClient

    NotebookClient(nb, kernel_name="python3", timeout=timeout, startup_timeout=120,
                   resources={"metadata": {"path": str(REPO)}}).execute()
    return nb


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python scripts/execute_notebook.py", description=__doc__.splitlines()[0])
    ap.add_argument("run_dir", type=Path, help="the run folder the notebook reads and writes (its OUT_DIR)")
    ap.add_argument("dest", type=Path, help="where the executed copy goes (.ipynb)")
    ap.add_argument("--profile", required=True, help="the run's profile (smoke, quick, full)")
    ap.add_argument("--data-dir", type=Path, required=True, help="holds cifar-10-batches-py/")
    ap.add_argument("--weights", default=None, help="published weights to analyse instead of training")
    ap.add_argument("--note", default=None, help="a sentence for the top of the copy")
    args = ap.parse_args(argv)
    if not (args.data_dir / "cifar-10-batches-py").is_dir():
        ap.error(f"{args.data_dir} has no cifar-10-batches-py/; pass the folder that holds it")
    if args.dest.suffix != ".ipynb":
        ap.error(f"{args.dest} must end in .ipynb")

    import nbformat

    nb = nbformat.read(REPO / "assignment.ipynb", as_version=4)
    if args.weights:
        setup = next(c for c in nb.cells if c.cell_type == "code" and "WEIGHTS = None" in c.source)
        setup.source = setup.source.replace("WEIGHTS = None", f"WEIGHTS = {args.weights!r}", 1)
    with tempfile.TemporaryDirectory() as jupyter:
        os.environ.update(kernel_environment(Path(jupyter), profile=args.profile, data_dir=args.data_dir,
                                             out_dir=args.run_dir))
        execute(nb)
    if args.note:
        nb.cells.insert(0, nbformat.v4.new_markdown_cell(f"> **About this copy.** {args.note}"))
    args.dest.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, args.dest)
    print(f"executed copy: {args.dest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
