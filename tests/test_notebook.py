"""assignment.ipynb: committed clean, runs headless end to end (smoke profile on
fixture data, CPU), writes every output, and a rerun reuses the trained models.

The notebook runs in a real Jupyter kernel through nbclient. The kernel spec
is written to a temporary JUPYTER_PATH for the interpreter running the tests,
so this works in a fresh environment with only requirements-test.txt
installed, and never picks up some other interpreter's "python3" kernel.
"""
from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import nbformat
import pytest

from cnnstress.config import Config
from conftest import copy_run

REPO = Path(__file__).resolve().parents[1]


def _load_runner():
    """scripts/execute_notebook.py: the one place the notebook's kernel is set up and run."""
    spec = importlib.util.spec_from_file_location("execute_notebook", REPO / "scripts" / "execute_notebook.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


RUNNER = _load_runner()
NOTEBOOK = REPO / "assignment.ipynb"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
FIGURES = ("training_curves.png", "failure_case_1.png", "confusion_matrix.png", "model_comparison.png",
           "robustness.png", "corruption_examples.png", "reliability_diagram.png", "adversarial.png",
           "faithfulness.png", "sanity_check.png", "label_suspects.png", "cam_methods.png")
OUTPUTS = FIGURES + ("analysis_report.txt", "metrics.json", "failures_baseline.csv", "failures_improved.csv",
                     "predictions_baseline.npz", "predictions_improved.npz",
                     "baseline/checkpoint.pt", "baseline/history.json",
                     "improved/checkpoint.pt", "improved/history.json",
                     "stress_baseline.json", "stress_improved.json", "corruption_accuracy.csv", "explanations.json")
# Written as well, but not checked after the smoke run: the command line's config, the lock, and the
# human review's figures (the fixture's test set is not in the official order).
ALSO_WRITTEN = ("report.html", "run_log.json", "config.json", ".cnnstress.lock", "label_errors_confirmed.png",
                "label_precision_at_k.png")
CACHED = ("baseline/checkpoint.pt", "improved/checkpoint.pt", "baseline/history.json", "improved/history.json",
          "predictions_baseline.npz", "predictions_improved.npz", "stress_baseline.json", "stress_improved.json")
# Figures whose inputs the rerun below leaves as they were (the threshold changes the failures and
# the explanations' samples, not the training or the stress tests): not redrawn (cnnstress.plots.files)
KEPT_FIGURES = ("training_curves.png", "robustness.png", "corruption_examples.png", "reliability_diagram.png",
                "adversarial.png")
THRESHOLD_LINE = "THRESHOLD = study.config.failure_threshold"
MAX_CELL_LINES = 3   # a stage is one or two calls on the Study; the logic lives in the package


def _read_notebook():
    return nbformat.read(NOTEBOOK, as_version=4)


def _text(cell) -> str:
    """Everything a code cell printed or displayed as text."""
    parts = []
    for out in cell.get("outputs", []):
        if out.output_type == "stream":
            parts.append(out.text)
        elif out.output_type in ("display_data", "execute_result"):
            parts.append(out.data.get("text/markdown", "") or out.data.get("text/plain", ""))
    return "".join(parts)


def _stage_cell(nb, number: int):
    """The code cell of stage `number` (the first code cell after its '## N.' heading)."""
    cells = nb.cells
    for i, cell in enumerate(cells):
        if cell.cell_type == "markdown" and cell.source.startswith(f"## {number}."):
            return next(c for c in cells[i + 1:] if c.cell_type == "code")
    raise AssertionError(f"no stage {number} in the notebook")


def _heading(nb, number: int) -> str:
    """The '## N. ...' line of section `number`."""
    return next(c.source.splitlines()[0] for c in nb.cells
                if c.cell_type == "markdown" and c.source.startswith(f"## {number}."))


def _stamp(path: Path) -> tuple[bytes, int]:
    return path.read_bytes(), path.stat().st_mtime_ns


# --- the committed file ----------------------------------------------------------

def _named(name: str) -> str:
    """An output's name as the first cell lists it: one entry per model (`<model>`)."""
    return name.replace("baseline", "<model>").replace("improved", "<model>")


def test_committed_notebook_has_no_outputs_and_sixteen_sections():
    raw = json.loads(NOTEBOOK.read_text(encoding="utf-8"))
    assert raw["nbformat"] == 4
    assert raw["metadata"]["kernelspec"]["name"] == "python3"
    for cell in raw["cells"]:
        if cell["cell_type"] == "code":
            assert cell["outputs"] == [], cell["source"]
            assert cell["execution_count"] is None, cell["source"]
    nb = _read_notebook()
    nbformat.validate(nb)
    for n in range(1, 17):
        assert _stage_cell(nb, n).source.strip()
    assert not any(c.source.startswith("## 17.") for c in nb.cells)
    # the first cell names every file the study writes
    intro = nb.cells[0].source
    for name in OUTPUTS + ALSO_WRITTEN:
        assert f"`{_named(name)}`" in intro, name
    # section 4 is titled after what its cell shows; explanations and the label review are separate sections
    assert "configuration" in _heading(nb, 4) and _stage_cell(nb, 4).source.strip() == "study.config"
    assert "study.explain(" in _stage_cell(nb, 13).source and "label_review" not in _stage_cell(nb, 13).source
    assert _stage_cell(nb, 14).source.strip() == "study.label_review()"
    # it closes with what was found, in sentences the package builds from the results
    assert _heading(nb, 16) == "## 16. What we found" and nb.cells[-1] is _stage_cell(nb, 16)
    assert nb.cells[-1].source.strip() == "study.findings()"
    # no setting typed into the prose: the threshold and the epochs come from study.config
    prose = " ".join(c.source for c in nb.cells if c.cell_type == "markdown")
    assert f"{Config().failure_threshold:.0%}" not in prose
    assert not re.search(r"\b\d+ epochs?\b", prose)
    assert sum(THRESHOLD_LINE in c.source for c in nb.cells) == 1
    setup = _stage_cell(nb, 1).source
    for name in ("PROFILE", "DATA_DIR", "OUT_DIR", "FORCE = False", "WEIGHTS = None", "%matplotlib inline"):
        assert name in setup
    for cell in nb.cells:
        if cell.cell_type == "code" and cell is not _stage_cell(nb, 1):
            lines = [line for line in cell.source.splitlines() if line.strip()]
            assert len(lines) <= MAX_CELL_LINES, cell.source


# --- executing it ----------------------------------------------------------------

@pytest.fixture(scope="module")
def notebook_env(shared_cifar_dir, tmp_path_factory):
    """Environment for the kernel: smoke profile, fixture data, a fresh output
    folder, no GPU, and a python3 kernel spec for this very interpreter."""
    out = tmp_path_factory.mktemp("notebook_out")
    env = {**RUNNER.kernel_environment(tmp_path_factory.mktemp("jupyter"), profile="smoke",
                                       data_dir=shared_cifar_dir, out_dir=out),
           "CUDA_VISIBLE_DEVICES": ""}         # device auto -> cpu
    with pytest.MonkeyPatch.context() as mp:   # the kernel inherits this process's environment
        for key, value in env.items():
            mp.setenv(key, value)
        yield out


def _execute(nb):
    return RUNNER.execute(nb, timeout=600)


@pytest.fixture(scope="module")
def first_run(notebook_env):
    nb = _execute(_read_notebook())
    return notebook_env, nb


@pytest.mark.slow
def test_notebook_runs_and_writes_every_output(first_run):
    out, nb = first_run
    for name in OUTPUTS:
        assert (out / name).is_file(), f"{name} missing after running the notebook"
    for name in FIGURES:
        assert (out / name).read_bytes()[:8] == PNG_SIGNATURE, name
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert not [o for o in cell.outputs if o.output_type == "error"], cell.source
    # figures are shown inline, in the stages that make them
    for stage in (3, 6, 7, 8, 9, 10, 12, 13):
        assert any("image/png" in o.get("data", {}) for o in _stage_cell(nb, stage).outputs), f"stage {stage}"
    assert "smoke" in _text(_stage_cell(nb, 1)) and "cpu" in _text(_stage_cell(nb, 1))
    # the smoke profile's ResNet-18, 16 channels wide (counted by hand in test_model_config.py)
    assert "701,466" in _text(_stage_cell(nb, 2))
    assert "| `seed` | `42` | training | yes |" in _text(_stage_cell(nb, 4))   # the Config shows itself
    assert "| test |" in _text(_stage_cell(nb, 3))                              # images per split and class
    assert "train loss" in _text(_stage_cell(nb, 5))          # the baseline was trained here
    assert "configuration change: {'augment': ('baseline', 'enhanced')}" in _text(_stage_cell(nb, 9))
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["profile"] == "smoke"
    assert metrics["comparison"]["config_diff"] == {"augment": ["baseline", "enhanced"]}
    assert metrics["baseline"]["n"] == 100 and metrics["baseline"]["epochs"] == 1
    report = (out / "analysis_report.txt").read_text()
    assert report.strip() in _text(_stage_cell(nb, 15))          # stage 15 prints the report it wrote
    assert "8. Can the explanations and the failures be trusted?" in report
    assert "failures are suspected label errors" in _text(_stage_cell(nb, 13))
    # the fixture's test set is synthetic: the human review does not apply, and stage 14 says so
    assert "label review: the loaded test set is not in the official order" in _text(_stage_cell(nb, 14))
    assert "7. Stress tests beyond accuracy" in report
    assert "mean corruption accuracy" in _text(_stage_cell(nb, 12))
    # the steps' results display themselves (Markdown tables), numbers as in metrics.json
    comparison = metrics["comparison"]["accuracy_diff"]
    assert (f"**comparison**: test accuracy {100 * comparison['acc_a']:.2f}% -> {100 * comparison['acc_b']:.2f}%"
            in _text(_stage_cell(nb, 10)))
    assert f"| baseline | {100 * metrics['baseline']['ece']:.2f}% -> " in _text(_stage_cell(nb, 12))
    assert "**explanations** (Grad-CAM)" in _text(_stage_cell(nb, 13))
    assert metrics["baseline"]["mean_corruption_accuracy"] == pytest.approx(
        json.loads((out / "stress_baseline.json").read_text())["results"]["corruptions"]["mean_corruption_accuracy"])
    assert f"{100 * metrics['baseline']['test_accuracy']:.2f}%" in _text(_stage_cell(nb, 7))
    found = _text(_stage_cell(nb, 16))                            # the findings, as the report's summary
    assert found.startswith("- ") and f"{100 * metrics['improved']['test_accuracy']:.2f}% (improved)" in found
    # the same sentences close the report (whose lines may break at a hyphen: compared without spaces)
    assert all("".join(line[2:].split()) in "".join(report.split()) for line in found.splitlines())


@pytest.mark.slow
def test_rerun_reuses_checkpoints_and_predictions(first_run, tmp_path, monkeypatch):
    """Run the whole notebook again in a new kernel (as after a restart), with
    stage 8's THRESHOLD set to 0: nothing is retrained or re-predicted (the
    checkpoint and prediction files keep their bytes and mtimes), and every
    wrong prediction becomes a failure, so three Grad-CAM cases are drawn;
    the figures made from unchanged results are not drawn again."""
    first, _ = first_run
    out = copy_run(first, tmp_path / "rerun")          # the first run's folder stays as it was
    monkeypatch.setenv("CNNSTRESS_OUT_DIR", str(out))
    before = {name: _stamp(out / name) for name in CACHED + KEPT_FIGURES}
    no_failures = (out / "failure_case_1.png").read_bytes()
    nb = _read_notebook()
    stage8 = _stage_cell(nb, 8)
    stage8.source = stage8.source.replace(THRESHOLD_LINE, "THRESHOLD = 0.0  #", 1)
    nb = _execute(nb)
    for name in CACHED + KEPT_FIGURES:
        assert _stamp(out / name) == before[name], f"{name} was rewritten on the rerun"
    assert (out / "failure_case_1.png").read_bytes() != no_failures
    for stage in (5, 9):
        text = _text(_stage_cell(nb, stage))
        assert "reusing finished checkpoint" in text and "train loss" not in text
    for i in (1, 2, 3):
        assert (out / f"failure_case_{i}.png").read_bytes()[:8] == PNG_SIGNATURE
    assert "case 3:" in _text(_stage_cell(nb, 8))
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["comparison"]["threshold"] == 0.0
    assert metrics["baseline"]["high_confidence_failures"] == round(100 * (1 - metrics["baseline"]["test_accuracy"]))
    report = " ".join((out / "analysis_report.txt").read_text().split())
    assert "Case 1 (failure_case_1.png)" in report and "Grad-CAM for the predicted class" in report
    # stage 8 drew the cases before the improved model existed; the report still says what it predicts
    assert report.count("The improved model predicts") == 3
    # stage 15 takes the failures of stages 7, 8 and 10 as they are: no second evaluation or Grad-CAM
    stage15 = _text(_stage_cell(nb, 15))
    logged = stage15.splitlines()
    assert not any(line.startswith(("case 1:", "baseline: test accuracy")) for line in logged), stage15[:2000]


@pytest.mark.slow
def test_weights_variable_loads_published_models_without_training(notebook_env, analysed_run, tmp_path,
                                                                  monkeypatch):
    """WEIGHTS = <published folder> in the setup cell: the training stages load
    the published models (nothing is trained or checkpointed) and the stages
    after them run on those models, the published numbers set beside. Run up to
    the model comparison: every later stage takes its models from the same
    Study, and `run --weights` takes them through every stage (test_weights.py)."""
    from cnnstress.weights import export_weights

    published = tmp_path / "published"
    export_weights(analysed_run, published)
    out = tmp_path / "out"
    monkeypatch.setenv("CNNSTRESS_OUT_DIR", str(out))
    nb = _read_notebook()
    setup = _stage_cell(nb, 1)
    setup.source = setup.source.replace("WEIGHTS = None", f"WEIGHTS = {str(published)!r}", 1)
    nb.cells = nb.cells[:nb.cells.index(_stage_cell(nb, 10)) + 1]
    nb = _execute(nb)
    assert not (out / "baseline").exists() and not (out / "improved").exists()
    for stage in (5, 9):
        text = _text(_stage_cell(nb, stage))
        assert "not trained here" in text and "train loss" not in text
    for name in ("training_curves.png", "confusion_matrix.png", "model_comparison.png"):
        assert (out / name).read_bytes()[:8] == PNG_SIGNATURE, name
    source = json.loads((analysed_run / "metrics.json").read_text())
    for name, stage in (("baseline", 7), ("improved", 10)):
        text = " ".join(_text(_stage_cell(nb, stage)).split())
        assert "published run (" in text and f"test accuracy {100 * source[name]['test_accuracy']:.2f}%" in text


def test_missing_data_folder_is_one_line_in_the_notebook(tmp_path, shared_cifar_dir):
    """Stage 3 with no CIFAR-10 (and no way to download it) shows the same
    one-line error as the command line, not a traceback."""
    from nbclient.exceptions import CellExecutionError

    blocker = tmp_path / "a-file"
    blocker.write_text("the data folder cannot be created under a file, so the download fails at once")
    nb = _read_notebook()
    stage3 = _stage_cell(nb, 3)
    nb.cells = nb.cells[:nb.cells.index(stage3) + 1]
    env = {**RUNNER.kernel_environment(tmp_path / "jupyter", profile="smoke", data_dir=blocker / "data",
                                       out_dir=tmp_path / "out"), "CUDA_VISIBLE_DEVICES": ""}
    with pytest.MonkeyPatch.context() as mp:
        for key, value in env.items():
            mp.setenv(key, value)
        with pytest.raises(CellExecutionError):
            _execute(nb)
    assert not [o for o in stage3.outputs if o.output_type == "error"]   # no traceback
    shown = _text(stage3)
    assert shown.count("\n") == 1 and shown.startswith("error: CIFAR-10 not found"), shown
    assert str(blocker / "data" / "cifar-10-batches-py") in shown
