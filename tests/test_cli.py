"""The command line: each bad input is one line on stderr, exit status 2,
and nothing already saved is touched."""
import argparse
import json
import os

import pytest

from cnnstress.__main__ import main
from cnnstress.config import Config, get_config
from cnnstress.data import BATCHES_DIR

SMOKE = ["--profile", "smoke", "--device", "cpu", "--no-progress"]


def _run(capsys, *argv):
    try:
        code = main(list(argv))
    except SystemExit as exc:  # argparse
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


def _one_line_error(err, *needles):
    lines = [l for l in err.splitlines() if l.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ")
    for needle in needles:
        assert needle in lines[0], lines[0]
    assert "Traceback" not in err


@pytest.fixture(scope="module")
def trained_out(shared_cifar_dir, tmp_path_factory):
    """A finished smoke run: out dir with baseline/checkpoint.pt."""
    out = tmp_path_factory.mktemp("out")
    code = main(["train", *SMOKE, "--data-dir", str(shared_cifar_dir), "--out-dir", str(out)])
    assert code == 0
    return out


def test_train_writes_checkpoint_and_history(trained_out, capsys):
    hist = json.loads((trained_out / "baseline" / "history.json").read_text())
    assert hist["config"]["profile"] == "smoke" and len(hist["history"]) == 1
    assert (trained_out / "baseline" / "checkpoint.pt").is_file()
    assert not list((trained_out / "baseline").glob(".*tmp"))  # no temp files left behind


def test_rerun_reuses_finished_checkpoint(trained_out, shared_cifar_dir, capsys):
    path = trained_out / "baseline" / "checkpoint.pt"
    before = path.read_bytes()
    code, out, _ = _run(capsys, "train", *SMOKE, "--data-dir", str(shared_cifar_dir), "--out-dir", str(trained_out))
    assert code == 0 and "reusing finished checkpoint" in out and "test accuracy" in out
    assert path.read_bytes() == before


def test_checkpoint_from_other_config_is_refused_and_kept(trained_out, shared_cifar_dir, capsys):
    path = trained_out / "baseline" / "checkpoint.pt"
    before = path.read_bytes()
    code, _, err = _run(capsys, "train", *SMOKE, "--epochs", "2", "--data-dir", str(shared_cifar_dir),
                        "--out-dir", str(trained_out))
    assert code == 2
    _one_line_error(err, "different config", "epochs: checkpoint 1 vs now 2", "--force")
    assert path.read_bytes() == before


def test_corrupt_checkpoint_is_a_clear_error(trained_out, shared_cifar_dir, capsys, tmp_path):
    out = tmp_path / "out"
    (out / "baseline").mkdir(parents=True)
    (out / "baseline" / "checkpoint.pt").write_bytes(b"not a checkpoint")
    code, _, err = _run(capsys, "train", *SMOKE, "--data-dir", str(shared_cifar_dir), "--out-dir", str(out))
    assert code == 2
    _one_line_error(err, "cannot be read", "--force")
    assert (out / "baseline" / "checkpoint.pt").read_bytes() == b"not a checkpoint"


@pytest.mark.parametrize("argv, needles", [
    (["--profile", "fast"], ["unknown profile 'fast'"]),
    (["--aug", "fancy"], ["unknown augmentation preset 'fancy'"]),
    (["--epochs", "0"], ["--epochs", "must be >= 1"]),
    (["--epochs", "-3"], ["--epochs"]),
    (["--precision", "fp8"], ["unknown precision 'fp8'"]),
])
def test_bad_arguments(capsys, shared_cifar_dir, tmp_path, argv, needles):
    args = ["train", "--profile", "smoke", "--device", "cpu", "--data-dir", str(shared_cifar_dir),
            "--out-dir", str(tmp_path / "o")]
    # later flags win in argparse, so appending overrides the defaults above
    code, _, err = _run(capsys, *args, *argv)
    assert code == 2
    _one_line_error(err, *needles)
    assert not (tmp_path / "o" / "baseline" / "checkpoint.pt").exists()


def test_cuda_without_cuda(capsys, shared_cifar_dir, tmp_path, monkeypatch):
    import torch
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    code, _, err = _run(capsys, "train", *SMOKE, "--device", "cuda", "--data-dir", str(shared_cifar_dir),
                        "--out-dir", str(tmp_path))
    assert code == 2
    _one_line_error(err, "no CUDA GPU", "--device cpu")


def test_missing_data_without_network(capsys, tmp_path, monkeypatch):
    import torchvision.datasets.utils as tvu

    def offline(*a, download_root, **k):
        os.makedirs(download_root)   # as torchvision does before it fetches
        raise OSError("<urlopen error [Errno -3] Temporary failure in name resolution>")
    monkeypatch.setattr(tvu, "download_and_extract_archive", offline)
    code, _, err = _run(capsys, "train", *SMOKE, "--data-dir", str(tmp_path / "d" / "cifar"),
                        "--out-dir", str(tmp_path / "o"))
    assert code == 2
    _one_line_error(err, "download failed", str(tmp_path / "d" / "cifar" / BATCHES_DIR))
    assert sorted(tmp_path.iterdir()) == []   # neither the data folders the download made nor the output folder


def test_truncated_batch(capsys, cifar_dir, tmp_path):
    batch = cifar_dir / BATCHES_DIR / "test_batch"
    batch.write_bytes(batch.read_bytes()[:1000])
    code, _, err = _run(capsys, "train", *SMOKE, "--data-dir", str(cifar_dir), "--out-dir", str(tmp_path / "o"))
    assert code == 2
    _one_line_error(err, "test_batch", "truncated")


def test_unwritable_output_folder(capsys, shared_cifar_dir, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("a file where a folder should be")
    code, _, err = _run(capsys, "train", *SMOKE, "--data-dir", str(shared_cifar_dir),
                        "--out-dir", str(blocker / "out"))
    assert code == 2
    _one_line_error(err, "cannot write to output folder", "--out-dir")
    assert blocker.read_text() == "a file where a folder should be"


def test_unfinished_checkpoint_needs_resume(capsys, shared_cifar_dir, tmp_path):
    from cnnstress.config import get_config
    from cnnstress.data import load_splits
    from cnnstress.train import fit
    cfg = get_config("smoke", device="cpu", epochs=2)  # what the CLI builds from the arguments below
    path = tmp_path / "baseline" / "checkpoint.pt"
    path.parent.mkdir()
    fit(cfg, load_splits(shared_cifar_dir, cfg, download=False), checkpoint_path=path, log=None, stop_after_epoch=1)
    before = path.read_bytes()
    argv = ["train", *SMOKE, "--epochs", "2", "--data-dir", str(shared_cifar_dir), "--out-dir", str(tmp_path)]
    code, _, err = _run(capsys, *argv)
    assert code == 2
    _one_line_error(err, "unfinished run (1/2 epochs)", "--resume", "--force")
    assert path.read_bytes() == before
    code, out, _ = _run(capsys, *argv, "--resume")
    assert code == 0 and "resuming" in out and "epoch  2/2" in out


@pytest.mark.parametrize("tamper, needle", [
    (lambda ck: ck.update(arch="vit_tiny"), "architecture 'vit_tiny'"),
    (lambda ck: ck["model"].update({"linear.weight": ck["model"]["linear.weight"].repeat(10, 1)}),
     "100 output classes"),
])
def test_checkpoint_for_another_model_is_refused(trained_out, shared_cifar_dir, capsys, tmp_path, tamper, needle):
    import torch
    ckpt = torch.load(trained_out / "baseline" / "checkpoint.pt", weights_only=True)
    tamper(ckpt)
    out = tmp_path / "out"
    (out / "baseline").mkdir(parents=True)
    torch.save(ckpt, out / "baseline" / "checkpoint.pt")
    before = (out / "baseline" / "checkpoint.pt").read_bytes()
    code, _, err = _run(capsys, "train", *SMOKE, "--data-dir", str(shared_cifar_dir), "--out-dir", str(out))
    assert code == 2
    _one_line_error(err, needle, "--force")
    assert (out / "baseline" / "checkpoint.pt").read_bytes() == before


def test_profile_flag_beats_the_environment_variable(monkeypatch):
    """$CNNSTRESS_PROFILE sets the default; an explicit --profile wins over it."""
    from cnnstress import pipeline
    monkeypatch.setenv("CNNSTRESS_PROFILE", "smoke")
    assert pipeline.default_profile("quick") == "quick"
    assert pipeline.default_profile() == "smoke"
    assert pipeline.default_profile(fallback="full") == "smoke"
    monkeypatch.delenv("CNNSTRESS_PROFILE")
    assert pipeline.default_profile(fallback="full") == "full"
    assert pipeline.default_profile("quick", fallback="full") == "quick"


# --------------------------------------------------------------------------- flags from the config fields

def _subparser(command):
    from cnnstress.__main__ import build_parser
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    return parser, sub.choices[command]


def _field_actions(command):
    """{field name: (its action, the title of the argparse group holding it)}."""
    _, sub = _subparser(command)
    found = {}
    for group in sub._action_groups:
        for action in group._group_actions:
            if action.dest in Config.__dataclass_fields__:
                found[action.dest] = (action, group.title)
    return found


EXPECTED_GROUPS = {"train": ("training", "runtime"), "run": ("training", "runtime", "failures", "stress", "explanations"),
                   "stress": ("training", "runtime", "failures", "stress"),
                   "explain": ("training", "runtime", "failures", "explanations")}


@pytest.mark.parametrize("command", ["train", "run", "stress", "explain"])
def test_every_field_of_the_commands_groups_has_its_flag(command):
    import dataclasses
    found = _field_actions(command)
    skipped = {"train": set(), "run": {"augment"}, "stress": {"augment", "stress"},
               "explain": {"augment", "explain"}}[command]
    expected = {f.name for f in dataclasses.fields(Config)
                if f.metadata["group"] in EXPECTED_GROUPS[command]} - skipped
    assert set(found) == expected
    for name, (action, title) in found.items():
        flag = "--" + name.replace("_", "-")
        assert action.option_strings[0] == flag and action.dest == name
        assert title.startswith(Config.__dataclass_fields__[name].metadata["group"] + " ")
        assert action.default is (None if name == "profile" else argparse.SUPPRESS)   # not given: the profile's
        assert Config.__dataclass_fields__[name].metadata["help"] in action.help or name == "profile"


def test_help_lists_the_groups(capsys):
    code, out, _ = _run(capsys, "run", "--help")
    assert code == 0
    for title in ("training (", "runtime (", "failures (", "stress (", "explanations (", "--config PATH"):
        assert title in out
    code, out, _ = _run(capsys, "train", "--help")
    assert code == 0 and "training (" in out and "explanations (" not in out and "--aug" in out


def test_old_flags_are_aliases_of_the_field_flags():
    parser, _ = _subparser("run")
    old = parser.parse_args(["run", "--threshold", "0.5", "--layer", "layer3", "--samples", "7", "--no-stress",
                             "--no-explain", "--corruption-subset", "9", "--adv-subset", "5", "--epochs", "2",
                             "--precision", "fp32", "--compile", "default", "--device", "cpu"])
    new = parser.parse_args(["run", "--failure-threshold", "0.5", "--cam-layer", "layer3",
                             "--faithfulness-samples", "7", "--no-stress", "--no-explain", "--corruption-subset", "9",
                             "--adv-subset", "5", "--epochs", "2", "--precision", "fp32", "--compile", "default",
                             "--device", "cpu"])
    assert vars(old) == vars(new)
    assert (old.failure_threshold, old.cam_layer, old.faithfulness_samples, old.stress, old.explain) == \
        (0.5, "layer3", 7, False, False)
    train = parser.parse_args(["train", "--aug", "enhanced"])
    assert train.augment == "enhanced"


def test_flag_values_become_the_config():
    from cnnstress.__main__ import _config, build_parser
    args = build_parser().parse_args(["run", "--profile", "smoke", "--adv-eps", "1", "3", "--adv-subset", "none",
                                      "--lr", "0.01", "--no-channels-last", "--stress"])
    cfg = _config(args)
    assert cfg == get_config("smoke", adv_eps=(1, 3), lr=0.01, channels_last=False, stress=True).replace(
        adv_subset=None)
    # not given = the profile's
    assert _config(build_parser().parse_args(["run", "--profile", "smoke"])) == get_config("smoke")


@pytest.mark.parametrize("argv, needles", [
    (["--adv-eps", "2", "300"], ["--adv-eps", "adv_eps must be whole grey levels"]),
    (["--adv-subset", "many"], ["--adv-subset", "expected a whole number or none, got 'many'"]),
    (["--failure-threshold", "1.5"], ["--failure-threshold/--threshold", "failure_threshold must be in [0, 1)"]),
    (["--cam-layer", "fc"], ["unknown cam_layer 'fc'"]),
    (["--stress", "yes"], ["unrecognized arguments: yes"]),
])
def test_bad_field_values_are_one_line(capsys, argv, needles):
    code, _, err = _run(capsys, "run", "--profile", "smoke", *argv)
    assert code == 2
    _one_line_error(err, *needles)


def test_config_round_trip(trained_out, shared_cifar_dir, capsys):
    """train saves its resolved config; --config starts from it (the same
    checkpoint is reused), and a flag given too overrides the file."""
    saved = trained_out / "config.json"
    assert Config.load(saved) == get_config("smoke", device="cpu")
    before = (trained_out / "baseline" / "checkpoint.pt").read_bytes()
    common = ["--data-dir", str(shared_cifar_dir), "--out-dir", str(trained_out)]
    code, out, _ = _run(capsys, "train", "--config", str(saved), "--no-progress", *common)
    assert code == 0 and "reusing finished checkpoint" in out and "profile smoke" in out
    code, _, err = _run(capsys, "train", "--config", str(saved), "--epochs", "2", "--no-progress", *common)
    assert code == 2
    _one_line_error(err, "different config", "epochs: checkpoint 1 vs now 2")
    assert (trained_out / "baseline" / "checkpoint.pt").read_bytes() == before
    assert Config.load(saved) == get_config("smoke", device="cpu")   # the refused run did not overwrite it


@pytest.mark.parametrize("content, argv, needles", [
    (None, [], ["config file", "does not exist", "outputs/config.json"]),
    ("{not json", [], ["is not valid JSON"]),
    ('{"epochs": 1, "colour": "red"}', [], ["unknown field(s) colour"]),
    ('{"epochs": 1}', ["--profile", "smoke"], ["--profile does not apply with --config"]),
])
def test_bad_config_file_is_one_line(capsys, tmp_path, content, argv, needles):
    path = tmp_path / "config.json"
    if content is not None:
        path.write_text(content)
    code, _, err = _run(capsys, "run", "--config", str(path), *argv, "--out-dir", str(tmp_path / "o"))
    assert code == 2
    _one_line_error(err, *needles)
    assert not (tmp_path / "o").exists()


def test_training_flags_do_not_apply_to_published_weights(capsys, tmp_path):
    code, _, err = _run(capsys, "stress", "--weights", str(tmp_path), "--lr", "0.1")
    assert code == 2
    _one_line_error(err, "--lr does not apply to published weights")
