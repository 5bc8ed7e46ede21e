"""runtime.eval_mode and the progress-bar helpers."""
import pytest
from torch import nn

from cnnstress.runtime import eval_mode, progress_bar, progress_enabled


def _modes(model: nn.Module) -> list[bool]:
    return [m.training for m in model.modules()]


@pytest.mark.parametrize("train", [True, False])
def test_eval_mode_sets_eval_and_restores_caller_mode(train):
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Dropout()).train(train)
    with eval_mode(model):
        assert _modes(model) == [False] * 4
    assert _modes(model) == [train] * 4


def test_eval_mode_restores_mixed_modes_after_exception():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).train()
    model[1].eval()  # frozen BatchNorm inside a training model
    before = _modes(model)
    assert before == [True, True, False]
    with pytest.raises(RuntimeError, match="boom"):
        with eval_mode(model):
            assert _modes(model) == [False] * 3
            raise RuntimeError("boom")
    assert _modes(model) == before


def test_progress_helpers():
    assert progress_enabled(True) is True and progress_enabled(False) is False
    assert progress_bar(3, "x", show=False) is None
    bar = progress_bar(3, "x", show=True)
    bar.update(3)
    assert bar.n == 3
    bar.close()


def test_batch_slices_cover_the_range_once_in_order():
    from cnnstress.runtime import batch_slices
    assert batch_slices(10, 4) == [slice(0, 4), slice(4, 8), slice(8, 10)]
    assert batch_slices(8, 4) == [slice(0, 4), slice(4, 8)]
    assert batch_slices(3, 100) == [slice(0, 3)] and batch_slices(0, 5) == []
    for n, b in ((97, 7), (1, 1), (64, 64)):
        covered = [i for s in batch_slices(n, b) for i in range(s.start, s.stop)]
        assert covered == list(range(n)) and all(s.stop - s.start <= b for s in batch_slices(n, b))
    for bad in (0, -1, True, 2.0):
        with pytest.raises(ValueError, match="batch_size"):
            batch_slices(5, bad)


def test_library_versions_read_torchvision_without_importing_it():
    """run_log.json's versions: torchvision's (with its build tag) read from its
    version.py, not imported (its models import torch._dynamo: 1-2 s per run)."""
    import json
    import subprocess
    import sys

    import pytest as pytest_module
    import torchvision

    from cnnstress.runlog import unimported_version

    code = ("import json, sys; from cnnstress.runlog import library_versions; v = library_versions(); "
            "print(json.dumps([v, 'torchvision' in sys.modules]))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    versions, imported = json.loads(done.stdout)
    assert not imported and versions["torchvision"] == torchvision.__version__
    assert unimported_version("pytest") == pytest_module.__version__       # no version.py: the metadata
    assert unimported_version("no_such_package_here") is None
