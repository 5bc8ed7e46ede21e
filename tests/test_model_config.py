import dataclasses

import pytest
import torch

from cnnstress import resnet18
from cnnstress.config import PROFILES, Config, get_config
from cnnstress.errors import ConfigError
from cnnstress.model import count_parameters


def test_resnet18_matches_the_cifar_reference():
    model = resnet18()
    assert count_parameters(model) == 11_173_962
    assert model.conv1.kernel_size == (3, 3) and model.conv1.stride == (1, 1)
    assert not any(isinstance(m, torch.nn.MaxPool2d) for m in model.modules())
    x = torch.randn(2, 3, 32, 32)
    feats = model.forward_features(x)
    assert feats.shape == (2, 512, 4, 4)
    assert model.forward_head(feats).shape == (2, 10)
    torch.testing.assert_close(model(x), model.forward_head(feats))


def _hand_count(w: int, classes: int = 10) -> int:
    """ResNet-18's parameters at width w, counted layer by layer: 3x3 convs
    without bias, BatchNorm weight and bias, 1x1 shortcut convs where the
    shape changes, the linear head."""
    total = 3 * 9 * w + 2 * w                                             # stem conv + bn
    for i, planes in enumerate((w, 2 * w, 4 * w, 8 * w)):
        c_in = planes // 2 if i else w
        total += c_in * planes * 9 + 2 * planes + planes * planes * 9 + 2 * planes   # first block
        total += c_in * planes + 2 * planes if i else 0                             # its shortcut
        total += 2 * (planes * planes * 9 + 2 * planes)                             # second block
    return total + 8 * w * classes + classes


@pytest.mark.parametrize("width", [64, 16, 8])
def test_width_scales_every_stage(width):
    """Config.width: the stem and the four stages have w, 2w, 4w, 8w channels;
    64 is the published network, 16 the smoke profile's (701,466 parameters)."""
    model = resnet18(width=width)
    assert count_parameters(model) == _hand_count(width)
    assert [model.layer1[0].conv1.out_channels, model.layer2[0].conv1.out_channels,
            model.layer3[0].conv1.out_channels, model.layer4[0].conv1.out_channels] == \
        [width, 2 * width, 4 * width, 8 * width]
    assert model.forward_features(torch.randn(2, 3, 32, 32)).shape == (2, 8 * width, 4, 4)
    assert _hand_count(64) == 11_173_962 and _hand_count(16) == 701_466
    assert get_config("smoke").width == 16 and get_config("quick").width == get_config("full").width == 64


def test_seeded_init_is_reproducible():
    torch.manual_seed(42)
    a = resnet18().state_dict()
    torch.manual_seed(42)
    b = resnet18().state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_config_defaults_are_the_seed_setting():
    cfg = get_config("full")
    assert (cfg.seed, cfg.epochs, cfg.lr, cfg.weight_decay, cfg.schedule) == (42, 30, 1e-3, 1e-4, "cosine")
    assert cfg.val_size == 5000 and cfg.train_subset is None and cfg.augment == "baseline"
    with pytest.raises(dataclasses.FrozenInstanceError, match="cannot assign to field 'epochs'"):
        cfg.epochs = 3


@pytest.mark.parametrize("kwargs, match", [
    (dict(epochs=0), "epochs must be >= 1"),
    (dict(epochs=-2), "epochs must be >= 1"),
    (dict(augment="fancy"), "unknown augmentation preset 'fancy'"),
    (dict(precision="fp8"), "unknown precision"),
    (dict(failure_threshold=1.0), "failure_threshold"),
])
def test_bad_config_values(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        get_config("smoke", **kwargs)


def test_unknown_profile_lists_the_choices():
    with pytest.raises(ConfigError, match="unknown profile 'fast'.*smoke, quick, full"):
        get_config("fast")


def test_training_key_ignores_runtime_fields_and_diff_names_changes():
    a = get_config("quick")
    b = a.replace(device="cpu", eval_batch_size=64, failure_threshold=0.9)
    assert a.training_key() == b.training_key()
    c = a.replace(augment="enhanced")
    assert a.diff(c) == {"augment": ("baseline", "enhanced")}
    assert Config.from_dict(c.to_dict()) == c
    assert set(PROFILES) == {"smoke", "quick", "full"}


# --------------------------------------------------------------------------- field metadata, save / load

# The fields a checkpoint depends on, as they were before the metadata carried groups.
LEARNED = ["seed", "epochs", "batch_size", "lr", "weight_decay", "schedule", "augment", "val_size",
           "train_subset", "precision", "width"]


def test_every_field_has_a_group_and_help():
    from cnnstress.config import GROUPS
    for f in dataclasses.fields(Config):
        assert f.metadata.get("group") in GROUPS, f.name
        assert isinstance(f.metadata.get("help"), str) and len(f.metadata["help"]) > 8, f.name
        if "choices" in f.metadata:   # the choices shown are the ones Config accepts
            for choice in f.metadata["choices"]:
                Config().replace(**{f.name: choice})
            with pytest.raises(ConfigError, match=f"unknown .*'no-such-choice'; choose one of {f.metadata['choices'][0]}"):
                Config().replace(**{f.name: "no-such-choice"})
    assert {f.metadata["group"] for f in dataclasses.fields(Config)} == set(GROUPS)


def test_training_key_is_the_training_group():
    assert list(Config().training_key()) == LEARNED
    assert list(Config.fields_in("training")) == LEARNED
    runtime = [f.name for f in dataclasses.fields(Config) if f.name not in LEARNED]
    assert all(Config.__dataclass_fields__[n].metadata["train"] is False for n in runtime)
    assert sum(len(Config.fields_in(g)) for g in ("training", "runtime", "failures", "stress", "explanations")) \
        == len(dataclasses.fields(Config))
    cfg = get_config("smoke")
    assert cfg.values_in("failures") == {"failure_threshold": 0.8, "top_failures": 3}
    assert cfg.values_in("stress")["adv_eps"] == (2, 8)
    with pytest.raises(ValueError, match="unknown config group 'gpu'"):
        Config.fields_in("gpu")


def test_save_load_round_trip(tmp_path):
    import json
    cfg = get_config("smoke", device="cpu", adv_eps=(1, 3), train_subset=None, lr=0.01)
    path = cfg.save(tmp_path / "config.json")
    assert json.loads(path.read_text())["adv_eps"] == [1, 3]
    assert not list(tmp_path.glob(".*tmp"))
    loaded = Config.load(path)
    assert loaded == cfg and loaded.adv_eps == (1, 3) and hash(loaded) == hash(cfg)
    # an older file without a newer field keeps its default; compile saved as a switch still loads
    data = cfg.to_dict()
    del data["sanity_samples"]
    data["compile"] = True
    path.write_text(json.dumps(data))
    assert Config.load(path) == cfg.replace(sanity_samples=Config().sanity_samples, compile="default")


@pytest.mark.parametrize("content, needles", [
    (None, ["does not exist", "outputs/config.json"]),
    ('{"epochs": 3,', ["is not valid JSON", "outputs/config.json"]),
    (b"\xff\xfe\x00garbage", ["is not valid JSON"]),
    ('[1, 2]', ["holds a JSON list"]),
    ('{"epochs": 3, "learning_rate": 0.1}', ["unknown field(s) learning_rate", "remove them"]),
    ('{"epochs": "3", "adv_eps": [1, 2.5]}', ["wrong type", "epochs='3' (expected int)", "adv_eps=[1, 2.5]"]),
    ('{"epochs": 0}', ["epochs must be >= 1"]),
])
def test_load_errors_are_one_line(tmp_path, content, needles):
    path = tmp_path / "config.json"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content)
    with pytest.raises(ConfigError) as info:
        Config.load(path)
    message = str(info.value)
    assert "\n" not in message and str(path) in message
    for needle in needles:
        assert needle in message
