"""scripts/remote_study.py (the GPU study command): its packing, transfer-rule check, seed summary and stage timer."""
from __future__ import annotations

import json
import math
import re
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from cnnstress.runlog import StageTime, StageTimer


def _load_script():
    """scripts/remote_study.py as a module (a script beside the package, not in it)."""
    import importlib.util
    path = Path(__file__).resolve().parents[1] / "scripts" / "remote_study.py"
    spec = importlib.util.spec_from_file_location("remote_study", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module          # its dataclasses look their module up while it loads
    spec.loader.exec_module(module)
    return module


remote_study = _load_script()
ALWAYS_DROP, DROP_ORDER, MAX_FILES = remote_study.ALWAYS_DROP, remote_study.DROP_ORDER, remote_study.MAX_FILES
SeedFigures, SeedRun, check_out_dir, main = (remote_study.SeedFigures, remote_study.SeedRun,
                                             remote_study.check_out_dir, remote_study.main)
pack_results, pinned_versions, summarize_seeds = (remote_study.pack_results, remote_study.pinned_versions,
                                                  remote_study.summarize_seeds)


def _fixture_outputs(work: Path, npz_bytes: int = 300_000) -> None:
    """A work folder shaped like a study's: main run, one extra seed, a preflight."""
    rng = np.random.default_rng(0)
    for run in ("main", "seed_43", "preflight"):
        d = work / run
        (d / "baseline").mkdir(parents=True)
        (d / "baseline" / "checkpoint.pt").write_bytes(b"x" * 50_000)        # never packed
        (d / "baseline" / "history.json").write_text('{"history": []}')
        (d / "metrics.json").write_text('{"baseline": {}}')
        (d / "analysis_report.txt").write_text("report\n")
        (d / ".predictions_baseline.npz.tmp").write_bytes(b"half")            # a torn temporary file
        for name in ("baseline", "improved"):   # incompressible: random bytes
            (d / f"predictions_{name}.npz").write_bytes(rng.integers(0, 256, npz_bytes, dtype=np.uint8).tobytes())
    (work / "study_run_log.json").write_text("{}")


def _names(path: Path) -> set[str]:
    with tarfile.open(path) as tar:
        return set(tar.getnames())


def test_pack_keeps_everything_but_checkpoints_and_temporaries(tmp_path):
    work, out = tmp_path / "work", tmp_path / "out"
    _fixture_outputs(work)
    packed = pack_results(work, out, log=None)
    names = _names(packed.path)
    assert packed.path == out / "results.tar.gz" and packed.dropped == ALWAYS_DROP
    assert packed.bytes == packed.path.stat().st_size and packed.members == len(names) == 3 * 5 + 1 - 2
    assert "work/main/predictions_improved.npz" in names and "work/seed_43/baseline/history.json" in names
    assert "work/preflight/metrics.json" in names and "work/preflight/predictions_baseline.npz" not in names
    assert not any(n.endswith((".pt", ".tmp")) for n in names)
    assert [p.name for p in out.iterdir()] == ["results.tar.gz"]   # no building leftovers
    assert check_out_dir(out) == []


def test_pack_drops_seed_predictions_first_then_all(tmp_path):
    work = tmp_path / "work"
    _fixture_outputs(work, npz_bytes=100_000)
    logs: list[str] = []
    # 4 incompressible arrays of 100 kB travel: the seeds' two must go for < 300 kB ...
    packed = pack_results(work, tmp_path / "a", max_bytes=300_000, log=logs.append)
    names = _names(packed.path)
    assert packed.dropped == ALWAYS_DROP + DROP_ORDER[0] and len(logs) == 1
    assert "work/main/predictions_baseline.npz" in names
    assert not any(n.startswith("work/seed_43/predictions_") for n in names)
    # ... and every array for < 150 kB, the rest kept
    packed = pack_results(work, tmp_path / "b", max_bytes=150_000, log=None)
    names = _names(packed.path)
    assert not any("predictions_" in n for n in names) and "work/main/metrics.json" in names
    with pytest.raises(ValueError, match="stays over"):
        pack_results(work, tmp_path / "c", max_bytes=100, log=None)
    assert not any((tmp_path / "c").iterdir())   # nothing written when it cannot fit


def test_check_out_dir_names_every_breach(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    for i in range(MAX_FILES):
        (out / f"f{i}.bin").write_bytes(b"0")
    assert check_out_dir(out) == []
    (out / "big one.bin").write_bytes(b"0" * 2_000)
    (out / "sub").mkdir()
    problems = check_out_dir(out, max_file_bytes=1_000, max_total_bytes=1_500)
    text = " | ".join(problems)
    assert "sub is not a plain file" in text
    assert "'big one.bin' has characters" in text
    assert f"10 entries, more than {MAX_FILES}" in text
    assert "big one.bin is 2,000 bytes, over 1,000" in text
    assert "2,008 bytes in all, over 1,500" in text
    assert len(problems) == 5


def test_seed_summary_by_hand():
    base = {42: (0.80, 100, 0.05, 0.60), 43: (0.84, 80, 0.03, None), 44: (0.82, 90, 0.04, 0.62)}
    imp = {42: (0.86, 40, 0.02, 0.70), 43: (0.88, 50, 0.01, None), 44: (0.87, 45, 0.03, 0.66)}
    runs = [SeedRun(seed=s, baseline=SeedFigures(*base[s]), improved=SeedFigures(*imp[s])) for s in (44, 42, 43)]
    summary = summarize_seeds(runs)
    assert summary.seeds == (42, 43, 44)
    fig = {f.figure: f for f in summary.figures}
    acc = fig["test_accuracy"]
    # baseline 0.80, 0.84, 0.82: mean 0.82, sample std sqrt((0.0004 + 0.0004 + 0) / 2) = 0.02
    assert acc.baseline_mean == pytest.approx(0.82) and acc.baseline_std == pytest.approx(0.02)
    # improved 0.86, 0.88, 0.87: mean 0.87, std 0.01; paired diffs 0.06, 0.04, 0.05: mean 0.05, std 0.01
    assert acc.improved_mean == pytest.approx(0.87) and acc.improved_std == pytest.approx(0.01)
    assert acc.diffs == pytest.approx((0.06, 0.04, 0.05))
    assert acc.diff_mean == pytest.approx(0.05) and acc.diff_std == pytest.approx(0.01)
    f = fig["failures"]   # 100, 80, 90 -> 40, 50, 45: diffs -60, -30, -45, mean -45, std 15
    assert (f.baseline_mean, f.improved_mean, f.diff_mean) == pytest.approx((90, 45, -45))
    assert f.diff_std == pytest.approx(15.0) and f.baseline_std == pytest.approx(10.0)
    # corruption accuracy exists for seeds 42 and 44 only: summarised over those two
    c = fig["mean_corruption_accuracy"]
    assert c.seeds == (42, 44) and c.diffs == pytest.approx((0.10, 0.04))
    assert c.diff_mean == pytest.approx(0.07) and c.diff_std == pytest.approx(math.sqrt(2 * 0.03 ** 2))
    text = summary.to_text()
    assert "test_accuracy (n=3): baseline 82.00 +- 2.00, improved 87.00 +- 1.00; difference 5.00 +- 1.00 pts" in text
    assert "[42: +6.00, 43: +4.00, 44: +5.00]" in text
    data = json.loads(json.dumps(summary.to_dict()))
    assert data["seeds"] == [42, 43, 44] and len(data["figures"]) == 4


def test_seed_summary_one_seed_and_bad_input():
    one = summarize_seeds([SeedRun(42, SeedFigures(0.8, 10, 0.05), SeedFigures(0.9, 5, 0.04))])
    assert [f.figure for f in one.figures] == ["test_accuracy", "failures", "ece"]   # no corruption figure
    assert one.figures[0].baseline_std is None and one.figures[0].diff_std is None
    assert "(one seed)" in one.to_text()
    with pytest.raises(ValueError, match="no seed runs"):
        summarize_seeds([])
    with pytest.raises(ValueError, match="once"):
        summarize_seeds([one.runs[0], one.runs[0]])


def test_stage_timer_lines_and_log(tmp_path):
    lines: list[str] = []
    timer = StageTimer(log=lines.append, prefix="main ")
    first = timer.lap("train baseline", 1000, "epochs x images")
    timer.lap("report")
    assert [s.name for s in timer.stages] == ["main train baseline", "main report"]
    assert re.fullmatch(r"\[\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ\] stage main train baseline: \d+\.\d s, "
                        r"1,000 images, [\d,]+ img/s \(epochs x images\)", lines[0]), lines[0]
    assert re.fullmatch(r"\[.*Z\] stage main report: \d+\.\d s", lines[1]), lines[1]
    assert first.images_per_second == pytest.approx(1000 / first.seconds)
    assert StageTime("x", "a", "b", seconds=0.0, images=5).images_per_second is None
    path = timer.write(tmp_path / "run_log.json", torch.device("cpu"), profile="smoke")
    data = json.loads(path.read_text())
    assert [s["name"] for s in data["stages"]] == ["main train baseline", "main report"]
    assert data["stages"][0]["images"] == 1000 and data["profile"] == "smoke"
    env = data["environment"]
    assert env["versions"]["torch"] == torch.__version__ and env["versions"]["numpy"] == np.__version__
    assert env["hardware"] and env["device"] == "cpu"


def test_pinned_versions(tmp_path):
    req = tmp_path / "requirements.txt"
    req.write_text("# pins\ntorch==2.14.1\ntorchvision==0.29.1  # vision\nnumpy>=1.26\n")
    assert pinned_versions(req) == {"torch": "2.14.1", "torchvision": "0.29.1"}
    assert pinned_versions(tmp_path / "missing.txt") == {}


def test_study_without_cuda_or_data_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main([str(tmp_path / "out"), "--device", "cuda", "--work-dir", str(tmp_path / "w")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "no CUDA GPU" in err and len(err.splitlines()) == 1
    rc = main([str(tmp_path / "out"), "--device", "cpu", "--work-dir", str(tmp_path / "w"),
               "--data-dir", str(tmp_path / "nodata"), "--kit-dir", str(tmp_path / "nokit")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "prepare_gpu_kit.sh" in err and len(err.splitlines()) == 1


@pytest.mark.slow
def test_study_end_to_end_on_fixture_data(shared_cifar_dir, tmp_path, capsys):
    """The whole command in the smoke profile on the CPU: weights and results
    come back within the transfer rules, and an extra seed is summarised."""
    out, work = tmp_path / "out", tmp_path / "work"
    rc = main([str(out), "--profile", "smoke", "--device", "cpu", "--no-preflight", "--seeds", "43",
               "--data-dir", str(shared_cifar_dir), "--work-dir", str(work)])
    log = capsys.readouterr().out
    assert rc == 0, log
    names = sorted(p.name for p in out.iterdir())
    assert "results.tar.gz" in names and "weights.json" in names and "SHA256SUMS" in names
    assert len(names) <= MAX_FILES and check_out_dir(out) == []
    members = _names(out / "results.tar.gz")
    assert {"work/main/metrics.json", "work/main/run_log.json", "work/seeds_summary.json",
            "work/seed_43/metrics.json", "work/study_run_log.json"} <= members
    assert re.search(r"stage main train baseline: [\d.]+ s, [\d,]+ images, [\d,]+ img/s", log)
    summary = json.loads((work / "seeds_summary.json").read_text())
    assert summary["seeds"] == [42, 43]
    from cnnstress.weights import load_published
    models = load_published(out, expect_profile="smoke")
    assert set(models) == {"baseline", "improved"}
    # republished after the analysis: the run's own test numbers ride along
    meta = json.loads((out / "weights.json").read_text())
    metrics = json.loads((work / "main" / "metrics.json").read_text())
    assert meta["models"]["baseline"]["reference"]["test_accuracy"] == metrics["baseline"]["test_accuracy"]
    assert not any(n.startswith("work/published/") for n in members)


def test_budget_decides_what_still_fits(capsys):
    fits = remote_study.fits
    timer = StageTimer(log=None)
    timer.started -= 100.0                      # 100 s spent
    assert fits(None, timer, 1e9, "anything")
    assert fits(300.0, timer, 150.0, "seed 43")
    assert not fits(200.0, timer, 150.0, "seed 44")
    out = capsys.readouterr().out
    assert "skipping seed 44" in out and "150 s needed" in out and "seed 43" not in out


def test_a_failing_preflight_exits_3_with_its_trace(shared_cifar_dir, tmp_path, capsys, monkeypatch):
    """A broken device path stops the study before the long run, with the
    trace in the log and a one-line error last."""
    import cnnstress.pipeline as pipeline

    def broken(*args, **kwargs):
        raise RuntimeError("CUDA error: no kernel image is available")
    monkeypatch.setattr(pipeline, "run_pipeline", broken)
    out, work = tmp_path / "out", tmp_path / "work"
    rc = main([str(out), "--profile", "smoke", "--device", "cpu", "--data-dir", str(shared_cifar_dir),
               "--work-dir", str(work)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 3
    assert err[-1].startswith("error: the smoke run on cpu failed (RuntimeError: CUDA error")
    assert any(line.startswith("Traceback") for line in err)
    log = json.loads((work / "study_run_log.json").read_text())
    assert log["failed"].startswith("preflight: RuntimeError") and not (work / "main").exists()
    assert list(out.iterdir()) == []


@pytest.mark.slow
def test_bench_writes_the_benchmark_json(shared_cifar_dir, tmp_path, capsys):
    bench = remote_study.bench
    dest = tmp_path / "bench.json"
    ok = bench(torch.device("cpu"), dest, shared_cifar_dir,
               extra=["--variants", "baseline,fused", "--steps", "1", "--warmup", "0", "--repeats", "1",
                      "--batch-size", "8"])
    assert ok, capsys.readouterr().out
    result = json.loads(dest.read_text())
    assert result["variants"] == ["baseline", "fused"] and result["cnnstress_baseline_img_per_s"] > 0
    assert "bench: cnnstress_baseline_fused_img_per_s" in capsys.readouterr().out
    assert not bench(torch.device("cpu"), tmp_path / "no.json", tmp_path / "nodata")
    assert "warning: benchmark failed (exit 2)" in capsys.readouterr().out and not (tmp_path / "no.json").exists()


def test_transfer_rules_are_options_with_the_remote_machines_defaults(capsys):
    parse, rules = remote_study.parse_args, remote_study.transfer_rules
    assert rules(parse(["out"])) == dict(max_files=8, max_file_bytes=16 * 2**20, max_total_bytes=64 * 2**20)
    assert rules(parse(["out", "--max-files", "3", "--max-file-mib", "0.5", "--max-total-mib", "1"])) == \
        dict(max_files=3, max_file_bytes=2**19, max_total_bytes=2**20)
    for flag, value in (("--max-files", "0"), ("--max-file-mib", "-1"), ("--max-total-mib", "nan")):
        with pytest.raises(SystemExit) as info:
            parse(["out", flag, value])
        assert info.value.code == 2
        assert f"{flag} must be positive" in capsys.readouterr().err


def test_the_script_runs_as_a_file_from_the_repository_root():
    """`python scripts/remote_study.py --help` (what full_study.sh runs) finds the package."""
    import subprocess
    repo = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, "scripts/remote_study.py", "--help"], cwd=repo, capture_output=True,
                          text=True, env={"PATH": "/usr/bin:/bin", "HOME": str(repo)}, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "--max-file-mib" in done.stdout and "transfer rules" in done.stdout
