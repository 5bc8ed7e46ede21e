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
    with pytest.raises(dataclasses.FrozenInstanceError):
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
