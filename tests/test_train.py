import math
import shutil

import pytest
import torch

from cnnstress.checkpoint import read_checkpoint
from cnnstress.data import load_splits
from cnnstress.errors import CheckpointError, TrainingDiverged
from cnnstress.evaluate import predict
from cnnstress.model import resnet18
from cnnstress.config import get_config
from cnnstress.runtime import cpu_has_bf16
from cnnstress.train import fit, load_model

from conftest import strip_time, tiny_training_config as _config, weights_equal


@pytest.fixture(scope="module")
def splits(shared_cifar_dir):
    return load_splits(shared_cifar_dir, _config(), download=False)


def _copy(src, dest):
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dest)
    return dest


def test_same_seed_same_history_and_weights(splits, two_epoch_runs):
    ref = two_epoch_runs["enhanced"]
    again = fit(ref.cfg, splits, log=None, stop_after_epoch=1)         # a second, independent run
    assert strip_time(again.history) == strip_time(ref.part.history)
    assert weights_equal(again.model, ref.part.model)
    other = fit(ref.cfg.replace(seed=7), splits, log=None, stop_after_epoch=1)
    assert not weights_equal(again.model, other.model)


def test_resume_equals_uninterrupted_run(splits, two_epoch_runs, tmp_path):
    ref = two_epoch_runs["enhanced"]
    assert len(ref.part.history) == 1
    path = _copy(ref.part_path, tmp_path / "b.pt")
    ckpt = read_checkpoint(path)
    assert ckpt["epoch"] == 1 and not ckpt["finished"]
    assert {"model", "optimizer", "scheduler", "rng", "history", "config"} <= set(ckpt)
    resumed = fit(ref.cfg, splits, checkpoint_path=path, resume=True, log=None)
    assert resumed.resumed_from_epoch == 1
    assert weights_equal(ref.whole.model, resumed.model)
    assert strip_time(ref.whole.history) == strip_time(resumed.history)
    # a finished checkpoint is reused, not retrained
    again = fit(ref.cfg, splits, checkpoint_path=path, resume=True, log=None)
    assert again.reused and weights_equal(ref.whole.model, again.model)


def test_a_finished_checkpoint_is_read_back_without_its_optimizer(splits, two_epoch_runs, tmp_path):
    """Reusing a finished run loads the model and the saved random state and
    nothing else: no optimizer is built, so an optimizer or scheduler state
    that could not be resumed does not matter; an unfinished checkpoint with
    the same states is refused."""
    ref = two_epoch_runs["enhanced"]
    ckpt = read_checkpoint(ref.whole_path)
    ckpt["optimizer"]["param_groups"] = ckpt["optimizer"]["param_groups"] * 2
    ckpt["scheduler"] = {"nonsense": 1}
    path = tmp_path / "finished.pt"
    torch.save(ckpt, path)
    torch.manual_seed(123)
    again = fit(ref.cfg, splits, checkpoint_path=path, resume=True, log=None)
    assert again.reused and weights_equal(ref.whole.model, again.model)
    assert torch.equal(torch.get_rng_state(), ckpt["rng"]["torch"])     # the saved state, as before
    ckpt.update(epoch=1, finished=False, history=ckpt["history"][:1])
    torch.save(ckpt, path)
    with pytest.raises(CheckpointError, match="cannot be resumed"):
        fit(ref.cfg, splits, checkpoint_path=path, resume=True, log=None)


def test_training_lowers_the_loss_and_learns(shared_cifar_dir):
    cfg = _config(epochs=3, lr=2e-3, train_subset=250)
    splits = load_splits(shared_cifar_dir, cfg, download=False)
    result = fit(cfg, splits, log=None)
    losses = [h["train_loss"] for h in result.history]
    assert losses[-1] < losses[0]
    assert [h["epoch"] for h in result.history] == [1, 2, 3]
    # cosine schedule: lr falls each epoch
    assert result.history[0]["lr"] > result.history[1]["lr"] > result.history[2]["lr"]
    test = predict(result.model, splits.test.images, splits.test.labels, device=torch.device("cpu"))
    assert test.accuracy > 0.3  # chance is 0.1; the fixture classes are easy
    assert not result.model.training


def test_nan_loss_stops_and_keeps_last_good_checkpoint(splits, tmp_path, monkeypatch):
    cfg = _config(epochs=2)
    path = tmp_path / "ckpt.pt"
    real = torch.nn.functional.cross_entropy
    calls = {"n": 0}
    steps_per_epoch = math.ceil(len(splits.train) / cfg.batch_size)

    def poisoned(logits, target, *args, **kwargs):
        loss = real(logits, target, *args, **kwargs)
        if logits.requires_grad:  # training steps only, not validation
            calls["n"] += 1
            if calls["n"] > steps_per_epoch:
                return loss * float("nan")
        return loss

    monkeypatch.setattr(torch.nn.functional, "cross_entropy", poisoned)
    with pytest.raises(TrainingDiverged, match=r"nan in epoch 2.*last good checkpoint"):
        fit(cfg, splits, checkpoint_path=path, log=None)
    ckpt = read_checkpoint(path)
    assert ckpt["epoch"] == 1
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())


def test_checkpoint_is_weights_only_and_format_1_still_resumes_identically(splits, two_epoch_runs, tmp_path):
    """Checkpoints hold only tensors, numbers, strings and containers; one in
    the old format (numpy's RNG state as an ndarray) still resumes bit-identically."""
    import numpy as np
    ref = two_epoch_runs["baseline"]
    cfg, whole = ref.cfg, ref.whole
    _copy(ref.part_path, tmp_path / "b.pt")
    ckpt = torch.load(tmp_path / "b.pt", weights_only=True)   # no allow-list needed
    assert ckpt["format"] == 2
    rng = ckpt["rng"]["numpy"]
    ckpt["rng"]["numpy"] = (rng["name"], rng["keys"].numpy().astype(np.uint32), rng["pos"], rng["has_gauss"],
                            rng["cached_gaussian"])
    ckpt["format"] = 1
    torch.save(ckpt, tmp_path / "b.pt")
    resumed = fit(cfg, splits, checkpoint_path=tmp_path / "b.pt", resume=True, log=None)
    assert resumed.resumed_from_epoch == 1 and weights_equal(whole.model, resumed.model)


def test_checkpoint_saved_before_width_existed_is_a_width_64_network(two_epoch_runs, tmp_path):
    """The full study's checkpoints were written before Config.width: their
    config has no such field, so it reads as 64, the network they hold. A
    config of another width is refused, naming the field."""
    ref = two_epoch_runs["baseline"]
    ckpt = torch.load(ref.part_path, weights_only=True)
    assert ckpt["config"]["width"] == 16                   # the smoke profile's
    torch.manual_seed(0)
    wide = resnet18(width=64)
    del ckpt["config"]["width"]
    ckpt["model"] = wide.state_dict()
    torch.save(ckpt, tmp_path / "old.pt")
    model, _ = load_model(tmp_path / "old.pt", config=ref.cfg.replace(width=64))
    assert weights_equal(model, wide)
    with pytest.raises(CheckpointError, match=r"different config \(width: checkpoint 64 vs now 16\)"):
        load_model(tmp_path / "old.pt", config=ref.cfg)


def test_checkpoint_that_would_run_code_is_refused_and_runs_nothing(splits, tmp_path):
    import os

    class RunsCode:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    marker = tmp_path / "marker"
    fit(_config(epochs=1), splits, checkpoint_path=tmp_path / "c.pt", log=None)
    ckpt = torch.load(tmp_path / "c.pt", weights_only=True)
    ckpt["history"] = [RunsCode()]
    torch.save(ckpt, tmp_path / "c.pt")
    torch.load(tmp_path / "c.pt", weights_only=False)  # the payload is live
    assert marker.exists()
    marker.unlink()
    with pytest.raises(CheckpointError) as err:
        read_checkpoint(tmp_path / "c.pt")
    msg = str(err.value)
    assert "\n" not in msg and "c.pt" in msg and "system" in msg and "--force" in msg
    assert not marker.exists()


def test_checkpoint_with_older_augmentation_draws_is_not_resumed(splits, two_epoch_runs, tmp_path):
    """An enhanced-preset checkpoint made with another version of the random
    draws (older checkpoints carry none: version 1) is another model: resuming
    or reusing it is refused in one line. The identity preset has no draws."""
    from cnnstress.augment import DRAWS_VERSION
    for augment, refused in (("enhanced", True), ("baseline", False)):
        cfg = two_epoch_runs[augment].cfg
        path = _copy(two_epoch_runs[augment].part_path, tmp_path / f"{augment}.pt")
        ckpt = torch.load(path, weights_only=True)
        assert ckpt["augment_draws"] == DRAWS_VERSION
        del ckpt["augment_draws"]
        torch.save(ckpt, path)
        if refused:
            with pytest.raises(CheckpointError) as err:
                fit(cfg, splits, checkpoint_path=path, resume=True, log=None)
            msg = str(err.value)
            assert "\n" not in msg and "draws" in msg and "--force" in msg
        else:
            assert fit(cfg, splits, checkpoint_path=path, resume=True, log=None).resumed_from_epoch == 1


@pytest.mark.skipif(not cpu_has_bf16(), reason="this CPU has no native bf16 (AVX-512 BF16/AMX): emulated bf16 is "
                                                "too slow for a test; the full study's own resume path is not covered here")
def test_resume_equals_uninterrupted_run_in_bf16(splits, tmp_path):
    # The full study trains in bf16 on such a CPU and is resumed every session: the same guarantee there.
    cfg = _config(epochs=2, augment="enhanced", precision="bf16")
    whole = fit(cfg, splits, checkpoint_path=tmp_path / "a.pt", log=None)
    fit(cfg, splits, checkpoint_path=tmp_path / "b.pt", log=None, stop_after_epoch=1)
    resumed = fit(cfg, splits, checkpoint_path=tmp_path / "b.pt", resume=True, log=None)
    assert resumed.resumed_from_epoch == 1
    assert weights_equal(whole.model, resumed.model)
    assert strip_time(whole.history) == strip_time(resumed.history)


def test_train_resume_from_the_command_line_equals_an_uninterrupted_run(shared_cifar_dir, splits, two_epoch_runs,
                                                                      tmp_path, capsys):
    from cnnstress.__main__ import main

    from conftest import cli
    flags = ["--epochs", "2", "--train-subset", "128", "--val-size", "50", "--batch-size", "32", "--precision", "fp32"]
    for name, augment in (("baseline", "baseline"), ("improved", "enhanced")):   # what the flags give
        assert two_epoch_runs[augment].cfg == get_config("smoke", device="cpu", epochs=2, train_subset=128,
                                                         val_size=50, batch_size=32, precision="fp32",
                                                         augment=augment)
    # an interrupted `train`: the baseline's checkpoint after epoch 1, the improved model finished
    # (reused, so only the baseline's second epoch is trained here)
    _copy(two_epoch_runs["baseline"].part_path, tmp_path / "part" / "baseline" / "checkpoint.pt")
    _copy(two_epoch_runs["enhanced"].whole_path, tmp_path / "part" / "improved" / "checkpoint.pt")
    assert main(cli("train", shared_cifar_dir, tmp_path / "part", *flags, "--resume")) == 0
    printed = capsys.readouterr().out
    assert "resuming from" in printed and printed.count("train loss") == 1
    a = read_checkpoint(two_epoch_runs["baseline"].whole_path)
    b = read_checkpoint(tmp_path / "part" / "baseline" / "checkpoint.pt")
    assert a["epoch"] == b["epoch"] == 2
    assert a["model"].keys() == b["model"].keys() and all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert strip_time(a["history"]) == strip_time(b["history"])


def test_median_epoch_seconds_is_robust_to_a_slowed_epoch_and_says_so_in_the_report():
    """A history whose epochs shared the machine: the median is the quiet
    epochs' time, the mean is not; the report's training section gives both."""
    from types import SimpleNamespace

    from cnnstress.stages.training import TrainingResult, describe, median_seconds, stage

    def epoch(i, seconds):
        return {"epoch": i, "train_loss": 1.0, "train_acc": 0.5, "val_loss": 1.0, "val_acc": 0.5, "lr": 1e-3,
                **({"seconds": seconds} if seconds is not None else {})}

    assert median_seconds([epoch(1, 440.0), epoch(2, 4356.0), epoch(3, 450.0)]) == 450.0
    assert median_seconds([epoch(1, 1.0), epoch(2, 2.0), epoch(3, 3.0), epoch(4, 100.0)]) == 2.5
    assert median_seconds([epoch(1, None)]) is None and median_seconds([]) is None
    history = [epoch(1, 440.0), epoch(2, 4356.0), epoch(3, 450.0)]
    trained = SimpleNamespace(name="baseline", config=_config(), checkpoint="c.pt", reference=None,
                              result=SimpleNamespace(history=history, train_seconds=5246.0, reused=False))
    m = describe(trained)
    assert m.median_epoch_seconds == 450.0
    study = SimpleNamespace(config=_config(), model_config=lambda name: _config())
    text = " ".join(p.text for s in stage.sections(study, TrainingResult(models={"baseline": m}))
                    for p in s.blocks if hasattr(p, "text"))
    assert "3 epochs in 5246 s (1748.7 s/epoch on average, median 450.0 s)" in text
