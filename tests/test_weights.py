"""Published weights (cnnstress.weights) and `run --weights`: export a smoke
run's models, load them back safely, and analyse them without training."""
import hashlib
import json
import math
import os
import shutil
import subprocess

import numpy as np
import pytest
import torch

from cnnstress.__main__ import main
from cnnstress.checkpoint import read_checkpoint
from cnnstress.config import get_config
from cnnstress.errors import CheckpointError
from cnnstress.weights import (CPU_ANALYSIS, METADATA_FILE, SUMS_FILE, analysis_config, export_weights,
                               load_published)

from conftest import cli

MODELS = ("baseline", "improved")


@pytest.fixture(scope="module")
def published(analysed_run, tmp_path_factory):
    dest = tmp_path_factory.mktemp("published") / "smoke"
    written = export_weights(analysed_run, dest)
    return dest, written


def _copy(published, tmp_path):
    dest = tmp_path / "pub"
    shutil.copytree(published[0], dest)
    return dest


def _one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def test_export_writes_hashed_bf16_shards_within_the_size_limit(published, analysed_run):
    dest, written = published
    assert sorted(p.name for p in dest.iterdir()) == sorted(p.name for p in written)
    shards = [p for p in written if p.suffix == ".pt"]
    assert {p.name.split("-")[0] for p in shards} == set(MODELS)
    assert all(p.stat().st_size <= 16 * 2**20 for p in shards)
    # SHA256SUMS in sha256sum's format, checked with an independent hash of each file
    lines = (dest / SUMS_FILE).read_text().splitlines()
    listed = dict(reversed(line.split("  ", 1)) for line in lines)
    assert set(listed) == {p.name for p in written if p.name != SUMS_FILE}
    for name, digest in listed.items():
        assert hashlib.sha256((dest / name).read_bytes()).hexdigest() == digest
    if shutil.which("sha256sum"):
        assert subprocess.run(["sha256sum", "--quiet", "-c", SUMS_FILE], cwd=dest).returncode == 0
    meta = json.loads((dest / METADATA_FILE).read_text())
    metrics = json.loads((analysed_run / "metrics.json").read_text())
    for name in MODELS:
        m = meta["models"][name]
        ckpt = read_checkpoint(analysed_run / name / "checkpoint.pt")
        assert m["config"] == json.loads(json.dumps(ckpt["config"])) and m["epochs"] == ckpt["epoch"]
        assert m["dtype"] == "bfloat16" and m["reference"]["test_accuracy"] == metrics[name]["test_accuracy"]
        assert m["reference"]["high_confidence_failures"] == metrics[name]["high_confidence_failures"]
        # every tensor of a shard: floats in bf16, integer buffers untouched
        for shard in m["shards"]:
            part = torch.load(dest / shard, weights_only=True)
            for key, t in part.items():
                src = ckpt["model"][key]
                if src.is_floating_point():
                    assert t.dtype == torch.bfloat16 and torch.equal(t, src.to(torch.bfloat16))
                else:
                    assert t.dtype == src.dtype and torch.equal(t, src)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_small_shards_reload_identically(analysed_run, tmp_path, dtype):
    state = read_checkpoint(analysed_run / "baseline" / "checkpoint.pt")["model"]
    floats = [t for t in state.values() if t.is_floating_point()]
    largest, total = 2 * max(t.numel() for t in floats), 2 * sum(t.numel() for t in floats)   # bytes in 16 bits
    with pytest.raises(ValueError, match="raise max_bytes"):   # the largest tensor does not fit one shard...
        export_weights(analysed_run, tmp_path / "too_small", dtype=dtype, max_bytes=largest * 9 // 10)
    assert not (tmp_path / "too_small").exists()   # ...so nothing is written
    max_bytes = 2 * largest
    written = export_weights(analysed_run, tmp_path / "pub", dtype=dtype, max_bytes=max_bytes)
    shards = [p for p in written if p.suffix == ".pt"]
    assert len(shards) >= 2 * math.ceil(total / max_bytes) >= 4 and all(p.stat().st_size <= max_bytes for p in shards)
    loaded = load_published(tmp_path / "pub", expect_profile="smoke")
    for name in MODELS:
        src = read_checkpoint(analysed_run / name / "checkpoint.pt")["model"]
        got = loaded[name].model.state_dict()
        assert got.keys() == src.keys()
        for key, t in src.items():
            want = t.to(dtype).to(t.dtype) if t.is_floating_point() else t
            assert got[key].dtype == t.dtype and torch.equal(got[key], want), key
        assert not loaded[name].model.training


def test_tampered_or_missing_shard_is_a_one_line_error(published, tmp_path, shared_cifar_dir, capsys):
    dest = _copy(published, tmp_path)
    shard = sorted(dest.glob("improved-*.pt"))[-1]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 1
    shard.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=f"{shard.name} does not match its SHA-256"):
        load_published(dest, expect_profile="smoke")
    code = main(cli("run", shared_cifar_dir, tmp_path / "out", "--weights", str(dest)))
    line = _one_line(capsys.readouterr().err)
    assert code == 2 and shard.name in line and "SHA-256" in line and "export them again" in line
    assert not (tmp_path / "out" / "predictions_baseline.npz").exists()
    shard.unlink()
    with pytest.raises(CheckpointError, match=f"{shard.name} is missing"):
        load_published(dest, expect_profile="smoke")
    (dest / SUMS_FILE).unlink()
    with pytest.raises(CheckpointError, match="holds no published weights"):
        load_published(dest, expect_profile="smoke")


def test_weights_of_another_profile_are_refused_naming_the_fields(published, tmp_path, shared_cifar_dir, capsys):
    dest = published[0]
    with pytest.raises(CheckpointError) as err:
        load_published(dest)   # expects the full profile
    msg = str(err.value)
    smoke, full = get_config("smoke"), get_config("full")
    differing = sorted(k for k, v in smoke.training_key().items() if full.training_key()[k] != v)
    assert differing and "\n" not in msg and "not trained with the full profile" in msg
    for field in differing:
        assert f"{field}: published {getattr(smoke, field)!r} vs full {getattr(full, field)!r}" in msg
    code = main(["run", "--weights", str(dest), "--device", "cpu", "--no-progress",
                 "--data-dir", str(shared_cifar_dir), "--out-dir", str(tmp_path / "out")])
    line = _one_line(capsys.readouterr().err)
    assert code == 2 and "epochs: published 1 vs full 30" in line


def test_a_shard_that_would_run_code_is_refused(published, tmp_path):
    """Even with matching hashes (an attacker can rewrite SHA256SUMS too), a
    shard is read with weights_only=True and cannot run code."""
    dest = _copy(published, tmp_path)
    marker = tmp_path / "marker"

    class RunsCode:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    shard = sorted(dest.glob("baseline-*.pt"))[0]
    part = torch.load(shard, weights_only=True)
    part["payload"] = RunsCode()
    torch.save(part, shard)
    sums = "".join(f"{hashlib.sha256(p.read_bytes()).hexdigest()}  {p.name}\n"
                   for p in sorted(dest.iterdir()) if p.name != SUMS_FILE)
    (dest / SUMS_FILE).write_text(sums)
    with pytest.raises(CheckpointError) as err:
        load_published(dest, expect_profile="smoke")
    assert shard.name in str(err.value) and "cannot be read safely" in str(err.value)
    assert "\n" not in str(err.value) and not marker.exists()


def test_analysis_config_caps_the_profile_sizes():
    full = analysis_config("full")
    assert full.training_key() == get_config("full").training_key() and full.test_subset is None
    assert {k: getattr(full, k) for k in CPU_ANALYSIS} == CPU_ANALYSIS
    smoke = analysis_config("smoke", adv_subset=5)
    assert smoke.corruption_subset == get_config("smoke").corruption_subset and smoke.adv_subset == 5


@pytest.mark.slow
def test_run_with_weights_reproduces_the_source_run(published, analysed_run, shared_cifar_dir, tmp_path, capsys):
    """`run --weights` analyses the published models without training and
    reproduces the source run's predictions up to the bf16 rounding of the
    weights; a rerun takes every stage from its caches."""
    dest = published[0]
    out = tmp_path / "out"
    assert main(cli("run", shared_cifar_dir, out, "--weights", str(dest), "--precision", "fp32")) == 0
    log = capsys.readouterr().out
    assert log.count("not trained here") == 2 and "train loss" not in log
    assert log.count("published weights loaded from") == 2 and "checkpoint reused" not in log
    assert not (out / "baseline").exists() and not (out / "improved").exists()
    metrics = json.loads((out / "metrics.json").read_text())
    source = json.loads((analysed_run / "metrics.json").read_text())
    for name in MODELS:
        # independent: the source checkpoint's weights rounded to bf16, evaluated in fp32
        from cnnstress.data import load_splits
        from cnnstress.evaluate import predict
        from cnnstress.model import resnet18_for
        ckpt = read_checkpoint(analysed_run / name / "checkpoint.pt")
        model = resnet18_for(analysis_config("smoke"))
        model.load_state_dict({k: v.to(torch.bfloat16).to(v.dtype) if v.is_floating_point() else v
                               for k, v in ckpt["model"].items()})
        test = load_splits(shared_cifar_dir, analysis_config("smoke"), download=False).test
        want = predict(model.eval(), test.images, test.labels, device=torch.device("cpu"), batch_size=512)
        with np.load(out / f"predictions_{name}.npz") as npz:
            np.testing.assert_allclose(npz["logits"], want.logits.numpy(), rtol=0, atol=1e-4)
            np.testing.assert_array_equal(npz["preds"], want.preds.numpy())
            with np.load(analysed_run / f"predictions_{name}.npz") as src:
                np.testing.assert_array_equal(npz["dataset_indices"], src["dataset_indices"])
                # the source ran on unrounded weights (bf16 autocast where the CPU has it):
                # the bf16 storage moves probabilities by well under 0.05 on this smoke model
                assert np.abs(npz["probs"] - src["probs"]).max() < 0.05
                agree = (npz["preds"] == src["preds"]).mean()
        m = metrics[name]
        assert m["published_run"]["test_accuracy"] == source[name]["test_accuracy"]
        assert abs(m["test_accuracy"] - source[name]["test_accuracy"]) <= 1 - agree + 1e-9
        assert agree >= 0.95
        assert "ece" in m and "faithfulness" in m      # the stress and explanation stages ran
        assert f"{name}: published run" in log
    assert (out / "analysis_report.txt").exists() and (out / "robustness.png").exists()
    # rerun: stamps are the published hashes, so every cache is reused
    assert main(cli("run", shared_cifar_dir, out, "--weights", str(dest), "--precision", "fp32")) == 0
    log = capsys.readouterr().out
    assert log.count("stress: reusing") == 2 and "explanations: reusing" in log
    # outputs never go into the weights folder
    assert main(cli("run", shared_cifar_dir, dest, "--weights", str(dest))) == 2
    assert "choose another --out-dir" in _one_line(capsys.readouterr().err)
