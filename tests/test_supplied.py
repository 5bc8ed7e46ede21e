"""Stress-testing a classifier the user supplies (issue 24): any CIFAR-10
model through the analysis stages, from Python (Study.from_models) and from
the command line (`analyse`). Proofs: our own ResNet-18 through the generic
path gives the built-in path's numbers exactly; a model of another
architecture (tests/foreign_models.py), with its own input normalisation, runs
through every stage, its Grad-CAM checked against pytorch-grad-cam; each bad
input is one line and writes nothing."""
from __future__ import annotations

import copy
import hashlib
import json
import re

import numpy as np
import pytest
import torch
from torch import nn

from cnnstress.__main__ import main
from cnnstress.augment import denormalize, normalize, to_float
from cnnstress.config import get_config
from cnnstress.errors import CnnstressError
from cnnstress.model import resnet18, resnet18_for
from cnnstress.study import Study
from cnnstress.supplied import (Preprocessed, SuppliedModelError, cascade_order, feature_maps, find_cam_layer,
                                finer_layer, import_factory, load_state, state_sha256, supply)
from cnnstress.xai.cam import GradCAM, get_layer
from cnnstress.xai.randomisation import DEFAULT_ORDER
from conftest import cli
from foreign_models import MLP, TinyVGG, tiny_vgg, train_briefly

MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)   # the foreign model's own normalisation


def _images(n: int = 4, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


# --- finding what the stages need in any model ---------------------------------------

def test_our_resnet_gets_the_layers_the_seed_study_uses():
    """The generic rules reproduce the built-in choices: Grad-CAM at layer4, the
    finer comparison layer layer3, the randomisation cascade DEFAULT_ORDER."""
    model = resnet18()
    assert find_cam_layer(model) == "layer4" and finer_layer(model, "layer4") == "layer3"
    assert cascade_order(model) == list(DEFAULT_ORDER)
    sizes = dict(feature_maps(model))
    assert sizes["layer3"] == (8, 8) and sizes["layer4"] == (4, 4) and sizes["pool"] == (1, 1)


def test_foreign_model_layers_by_its_own_names():
    model = tiny_vgg()
    assert find_cam_layer(model) == "features"                 # its last ReLU's 8x8 map, the container's output
    assert finer_layer(model, "features") == "features.5"       # 16x16
    assert cascade_order(model) == ["classifier", "features"]
    wrapped = Preprocessed(model, mean=MEAN, std=STD)
    assert find_cam_layer(wrapped) == "features" and cascade_order(wrapped) == ["classifier", "features"]
    assert get_layer(wrapped, "features.7") is model.features[7]   # the user's names reach inside the wrapper


def test_preprocessed_feeds_the_model_its_own_normalisation():
    model = tiny_vgg().eval()
    x = normalize(to_float(_images()))                        # what every stage feeds
    ours = Preprocessed(model, mean=MEAN, std=STD)(x)
    by_hand = model((denormalize(x) - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1))
    torch.testing.assert_close(ours, by_hand)
    fn = Preprocessed(model, fn=lambda v: v * 2 - 1)
    torch.testing.assert_close(fn(x), model(denormalize(x) * 2 - 1))
    assert "mean (0.5, 0.5, 0.5), std (0.25, 0.25, 0.25)" in Preprocessed(model, mean=MEAN, std=STD).describe()


def test_gradcam_on_the_foreign_model_matches_pytorch_grad_cam():
    """Our Grad-CAM on the wrapped model at the layer found for it equals
    pytorch-grad-cam's on the bare model fed the model's own normalisation
    (the oracle test_gradcam runs for our ResNet-18)."""
    from pytorch_grad_cam import GradCAM as PGCGradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    torch.manual_seed(3)
    model = TinyVGG().eval()
    sup = supply("vgg", model, preprocess=(MEAN, STD))
    x = normalize(to_float(_images(3, seed=5)))
    classes = [0, 1, 2]
    ours = GradCAM(sup.module, get_layer(sup.module, sup.cam_layer)).attribute(x, targets=classes)
    bare = copy.deepcopy(model)
    x_own = (denormalize(x) - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    with PGCGradCAM(bare, [bare.features]) as pgc:
        maps = pgc(x_own, [ClassifierOutputTarget(c) for c in classes])
        acts = pgc.activations_and_grads.activations[0].numpy()
        grads = pgc.activations_and_grads.gradients[0].numpy()
        raw = np.maximum(pgc.get_cam_image(x_own, None, None, acts, grads), 0)
    scale = np.abs(raw).max()
    assert scale > 0 and not ours.zero.any() and raw.shape == (3, 8, 8)
    np.testing.assert_allclose(ours.raw.numpy(), raw, rtol=1e-5, atol=1e-5 * scale)
    np.testing.assert_allclose(ours.maps.numpy(), maps, atol=1e-5)


# --- the checks on what is supplied ----------------------------------------------------

@pytest.mark.parametrize("model, kwargs, match", [
    (nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 100)), {},
     r"returns \(2, 100\) for 2 images; the analysis needs logits \(N, 10\)"),
    (MLP(), {}, "MLP has no layer with a spatial feature map for Grad-CAM; name one with cam_layer="),
    (tiny_vgg(), {"cam_layer": "features.99"}, "has no layer 'features.99' for Grad-CAM; its top-level layers: "
                                               "features, pool, classifier"),
    (tiny_vgg(), {"cam_layer": nn.Conv2d(1, 1, 1)}, "not inside the model"),
    (tiny_vgg(), {"preprocess": ((0.5, 0.5), (1, 1, 1))}, "three numbers each"),
    (tiny_vgg(), {"preprocess": "imagenet"}, "preprocess must be None, \\(mean, std\\) or a callable"),
    (nn.Linear(3, 10), {}, "fails on a batch of CIFAR-10 images"),
    ("not a model", {}, "is a str, not a torch.nn.Module"),
])
def test_supply_refuses_with_one_line(model, kwargs, match):
    with pytest.raises(SuppliedModelError, match=match) as info:
        supply("m", model, **kwargs)
    assert "\n" not in str(info.value)


def test_supply_names_identity_and_cam_layer():
    model = tiny_vgg()
    sup = supply("vgg", model, cam_layer=model.features[5])
    assert sup.cam_layer == "features.5" and not sup.cam_found and sup.sha256 == state_sha256(model)
    assert sup.parameters == sum(p.numel() for p in model.parameters())
    again = supply("vgg", tiny_vgg(), cam_layer="features.5")
    assert again.stamp == sup.stamp                                      # same weights, layer, preprocessing
    assert supply("vgg", tiny_vgg()).stamp != sup.stamp                  # another CAM layer: another cache key
    assert supply("vgg", tiny_vgg(), preprocess=lambda v: v).stamp == ""  # a callable: never cached
    for bad in ("", "a/b", "..", "x" * 41):
        with pytest.raises(SuppliedModelError, match="is not usable"):
            supply(bad, tiny_vgg())


def test_state_sha256_sees_every_byte():
    a, b = tiny_vgg(), tiny_vgg()
    assert state_sha256(a) == state_sha256(b)
    with torch.no_grad():
        b.classifier.bias[3] += 1e-6
    assert state_sha256(a) != state_sha256(b)


def test_load_state_reads_state_dicts_and_names_what_does_not_fit(tmp_path):
    source = tiny_vgg()
    with torch.no_grad():
        source.classifier.bias.fill_(0.25)
    plain, nested = tmp_path / "plain.pt", tmp_path / "nested.pt"
    torch.save(source.state_dict(), plain)
    torch.save({"model": source.state_dict(), "epoch": 3}, nested)    # as our checkpoint.pt holds it
    for path in (plain, nested):
        target = TinyVGG()
        digest = load_state(target, path)
        assert torch.equal(target.classifier.bias, source.classifier.bias) and len(digest) == 64

    def refused(model, path, match):
        with pytest.raises(SuppliedModelError, match=match) as info:
            load_state(model, path)
        assert "\n" not in str(info.value)

    refused(TinyVGG(width=8), plain, r"features.0.weight has shape \(16, 3, 3, 3\), the model \(8, 3, 3, 3\)")
    refused(resnet18(), plain, r"does not fit ResNet: missing conv1.weight, bn1.weight, bn1.bias, "
                               r"bn1.running_mean, bn1.running_var \(\+\d+ more\); unexpected features.0.weight")
    torch.save([1, 2], tmp_path / "list.pt")
    refused(TinyVGG(), tmp_path / "list.pt", "does not hold a state_dict")
    refused(TinyVGG(), tmp_path / "missing.pt", "not found")

    class Sneaky:   # a pickle that would run code: weights_only refuses it
        def __reduce__(self):
            return (print, ("pwned",))
    torch.save({"features.0.weight": Sneaky()}, tmp_path / "evil.pt")
    refused(TinyVGG(), tmp_path / "evil.pt", r"cannot read .*evil.pt as weights \(torch.load, weights_only=True\)")


@pytest.mark.parametrize("spec, match", [
    ("foreign_models", "must be PKG.MODULE:FACTORY"),
    ("no_such_module_here:f", "cannot import 'no_such_module_here'"),
    ("foreign_models:nope", "foreign_models has no 'nope'"),
    ("foreign_models:torch", "not a function or class"),
])
def test_import_factory_errors(spec, match):
    with pytest.raises(SuppliedModelError, match=match):
        import_factory(spec)


def test_import_factory_finds_classes_and_functions():
    assert import_factory("cnnstress.model:resnet18") is resnet18
    assert import_factory("foreign_models:TinyVGG") is TinyVGG


# --- the whole analysis -----------------------------------------------------------------

@pytest.fixture(scope="module")
def foreign_weights(tiny_splits, tmp_path_factory):
    """The foreign model trained a little on the fixture's training images,
    with its own normalisation, saved as a plain state_dict."""
    model = train_briefly(tiny_vgg(), tiny_splits.train.images, tiny_splits.train.labels, mean=MEAN, std=STD)
    path = tmp_path_factory.mktemp("foreign") / "vgg.pt"
    torch.save(model.state_dict(), path)
    return path


@pytest.mark.slow
def test_analyse_a_foreign_model_from_the_command_line(foreign_weights, shared_cifar_dir, tmp_path, capsys):
    out = tmp_path / "out"
    args = cli("analyse", shared_cifar_dir, out, "--model", "foreign_models:tiny_vgg", "--weights",
               str(foreign_weights), "--name", "vgg", "--mean", *map(str, MEAN), "--std", *map(str, STD))
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "vgg: foreign_models:tiny_vgg, 24,266 parameters, Grad-CAM at 'features' (the deepest spatial layer" \
        in printed
    metrics = json.loads((out / "metrics.json").read_text())
    supplied = metrics["vgg"]["supplied"]
    assert supplied["sha256"] == hashlib.sha256(foreign_weights.read_bytes()).hexdigest()
    assert supplied["cam_layer"] == "features" and supplied["parameters"] == 24266
    assert supplied["preprocessing"].startswith("mean (0.5, 0.5, 0.5), std (0.25, 0.25, 0.25)")
    assert "comparison" not in metrics and metrics["stages"] == [
        "training", "failures", "stress", "explanations", "label_review"]
    for key in ("test_accuracy", "mean_corruption_accuracy", "ece", "faithfulness", "sanity_check"):
        assert key in metrics["vgg"], key
    assert metrics["explanations"]["sanity"]["vgg"]["gradcam"]["steps"] == ["original", "classifier", "features"]
    for name in ("failure_case_1.png", "robustness.png", "adversarial.png", "faithfulness.png", "sanity_check.png",
                 "label_suspects.png", "cam_methods.png", "report.html", "predictions_vgg.npz", "stress_vgg.json",
                 "confusion_matrix.png"):   # one model: the failures stage draws its confusion matrix
        assert (out / name).is_file(), name
    assert not (out / "model_comparison.png").exists() and not (out / "vgg").exists()   # nothing trained
    report = " ".join((out / "analysis_report.txt").read_text().split())
    assert "vgg: supplied as foreign_models:tiny_vgg, weights" in report and supplied["sha256"] in report
    assert "Grad-CAM at 'features' (found: the deepest layer with a spatial feature map)" in report
    assert "Files: metrics.json, predictions_vgg.npz hold every number above; failures_vgg.csv lists" in report
    # a second run takes stress and explanations from their caches, keyed on the weights
    before = {n: (out / n).stat().st_mtime_ns for n in ("stress_vgg.json", "explanations.json",
                                                         "predictions_vgg.npz")}
    assert main(args) == 0
    assert {n: (out / n).stat().st_mtime_ns for n in before} == before


@pytest.mark.parametrize("extra, match", [
    (["--model", "foreign_models:tiny_vgg", "--weights", "{resnet}"], "does not fit TinyVGG: missing features"),
    (["--model", "foreign_models:nope"], "foreign_models has no 'nope'"),
    (["--model", "foreign_models:hundred_classes"], r"returns \(2, 100\) for 2 images"),
    (["--model", "foreign_models:mlp"], "no layer with a spatial feature map for Grad-CAM; name one with "
                                        r"cam_layer= \(--cam-layer\)"),
    (["--model", "foreign_models:tiny_vgg", "--cam-layer", "features.99"], "has no layer 'features.99'"),
    (["--model", "foreign_models:broken"], r"calling broken\(\) failed: RuntimeError: no such checkpoint"),
    (["--model", "foreign_models:tiny_vgg", "--model", "foreign_models:tiny_vgg"], "both models are called "
                                                                                   "'tiny_vgg'"),
    (["--model", "foreign_models:tiny_vgg", "--name", "a", "--name", "b"], "--name is given 2 time"),
    (["--model", "foreign_models:tiny_vgg", "--mean", "0.5", "0.5", "0.5"], "--mean and --std go together"),
])
def test_analyse_bad_input_is_one_line_and_writes_nothing(extra, match, trained_run, shared_cifar_dir, tmp_path,
                                                           capsys):
    out = tmp_path / "out"
    extra = [e.replace("{resnet}", str(trained_run / "baseline" / "checkpoint.pt")) for e in extra]
    assert main(cli("analyse", shared_cifar_dir, out, *extra)) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and re.search(match, err), err
    assert not out.exists()


@pytest.mark.slow
def test_our_models_through_the_generic_path_give_the_built_in_numbers(analysed_run, shared_cifar_dir, tmp_path,
                                                                      monkeypatch):
    """`analyse --model <factory of our ResNet-18> --weights <checkpoint>` for
    both trained models: every analysis number in metrics.json equals the
    built-in run's (only how the models came about and the times differ).
    The factory is a module of the user's: the smoke run's network is the
    ResNet-18 at the smoke profile's width."""
    (tmp_path / "smoke_resnet.py").write_text(
        "from functools import partial\n\nfrom cnnstress.config import get_config\n"
        "from cnnstress.model import resnet18\n\nmodel = partial(resnet18, width=get_config('smoke').width)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    out = tmp_path / "generic"
    config = json.loads((analysed_run / "config.json").read_text())
    args = cli("analyse", shared_cifar_dir, out, "--test-subset", str(config["test_subset"]))
    for name in ("baseline", "improved"):
        args += ["--model", "smoke_resnet:model", "--weights", str(analysed_run / name / "checkpoint.pt"),
                 "--name", name]
    assert main(args) == 0
    built_in = json.loads((analysed_run / "metrics.json").read_text())
    generic = json.loads((out / "metrics.json").read_text())
    training = {"augment", "best_val_accuracy", "best_val_epoch", "checkpoint", "epochs", "final_val_accuracy",
                "reused_checkpoint", "train_seconds", "median_epoch_seconds", "supplied"}
    for name in ("baseline", "improved"):
        a = {k: v for k, v in built_in[name].items() if k not in training}
        b = {k: v for k, v in generic[name].items() if k not in training}
        assert a == b, name
    for stage in ("stress", "explanations"):
        a, b = (_without_seconds(m[stage]) for m in (built_in, generic))
        assert a == b, stage
    assert {k: v for k, v in built_in["comparison"].items() if k != "config_diff"} == \
        {k: v for k, v in generic["comparison"].items() if k != "config_diff"}
    assert generic["comparison"]["config_diff"] == {}


def _without_seconds(d):
    if isinstance(d, dict):
        return {k: _without_seconds(v) for k, v in d.items() if k != "seconds"}
    return d


def test_from_models_in_python_with_its_own_preprocessing(foreign_weights, shared_cifar_dir, tmp_path):
    """The same from Python: one model object, its normalisation as (mean, std);
    every step of the notebook works on it, the comparison is left out."""
    model = TinyVGG()
    model.load_state_dict(torch.load(foreign_weights, weights_only=True))
    study = Study.from_models({"vgg": model}, preprocess=(MEAN, STD), profile="smoke", data_dir=shared_cifar_dir,
                              out_dir=tmp_path / "out", log=None, device="cpu")
    assert study.models == ("vgg",) and study.cam_layer("vgg") == "features"
    # the notebook's first steps: nothing to train, no curves, the setup says so
    assert study.train("vgg") is study.trained["vgg"] and study.curves() is None
    assert "seed 42, supplied: vgg (not trained here)" in str(study.describe())
    fails = study.failures()                                  # the first model by default
    x = normalize(to_float(study.splits.test.images))
    with torch.no_grad():
        by_hand = model((denormalize(x) - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1))
    assert fails.summary.test_accuracy == pytest.approx(
        float((by_hand.argmax(1) == study.splits.test.labels).float().mean()))
    study.run()
    assert study.result("comparison") is None
    found = study.findings()
    assert found[0].startswith("Supplied, not trained here: vgg (python object, SHA-256 ")
    assert any("(vgg)" in line for line in found[1:])
    with pytest.raises(CnnstressError, match="one or two models"):
        Study.from_models({"a": model, "b": model, "c": model}, data_dir=shared_cifar_dir, out_dir=tmp_path / "x")


def test_load_state_reads_a_published_folder_by_name(trained_run, tmp_path):
    """--weights results/full --name baseline: the published model's weights
    (hashes verified), the same tensors load_published gives, and its stamp."""
    from cnnstress.weights import export_weights, load_published

    published = tmp_path / "published"
    export_weights(trained_run, published)
    model = resnet18_for(get_config("smoke"))
    stamp = load_state(model, published, "baseline")
    reference = load_published(published, expect_profile=None, names=("baseline",))["baseline"]
    assert stamp == reference.stamp
    for key, value in reference.model.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key
    with pytest.raises(CnnstressError, match="publishes no model 'other'; it has baseline, improved"):
        load_state(resnet18_for(get_config("smoke")), published, "other")
    with pytest.raises(SuppliedModelError, match="does not fit TinyVGG"):
        load_state(TinyVGG(), published, "improved")
