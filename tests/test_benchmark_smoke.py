"""Smoke test of benchmarks/train_throughput.py on a tiny CIFAR-format fixture."""
from __future__ import annotations

import importlib.util
import json
import math
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "train_throughput.py"
EVAL_SCRIPT = ROOT / "benchmarks" / "eval_throughput.py"
STRESS_SCRIPT = ROOT / "benchmarks" / "stress_throughput.py"
PER_FILE = 20


class _Py2Pickler(pickle._Pickler):
    """Writes str/bytes as Python 2 byte strings, like the official CIFAR-10
    files: pickle.load(encoding="bytes") gives b"data" keys (cnnstress.data)
    and encoding="latin1" gives "data" keys (torchvision's CIFAR10)."""
    dispatch = pickle._Pickler.dispatch.copy()

    def _save_py2_str(self, obj):
        raw = obj.encode("latin1") if isinstance(obj, str) else bytes(obj)
        if len(raw) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(raw)]) + raw)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(raw)) + raw)
        self.memoize(obj)

    dispatch[str] = _save_py2_str
    dispatch[bytes] = _save_py2_str


def _dump(obj, path: Path) -> None:
    with open(path, "wb") as f:
        _Py2Pickler(f, protocol=2).dump(obj)


def _write_fixture(root: Path) -> None:
    """Like conftest.write_cifar, but with Python 2 byte strings: the seed-style
    run reads the files through torchvision, which needs str keys under latin1."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for name in names:
        _dump({b"batch_label": name.encode(), b"labels": [i % 10 for i in range(PER_FILE)],
               b"data": rng.integers(0, 256, (PER_FILE, 3072), dtype=np.uint8),
               b"filenames": [f"{name}_{i}.png".encode() for i in range(PER_FILE)]},
              folder / name)
    _dump({b"num_cases_per_batch": PER_FILE, b"num_vis": 3072,
           b"label_names": [c.encode() for c in ("airplane", "automobile", "bird", "cat", "deer",
                                                 "dog", "frog", "horse", "ship", "truck")]},
          folder / "batches.meta")


def _load_script(path: Path = SCRIPT):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def one_thread():
    """One intra-op thread: a smoke run on a busy CI box is then not slowed
    down by OpenMP threads spinning for a core another process holds."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.slow
def test_benchmark_json_smoke(tmp_path, capsys, one_thread):
    _write_fixture(tmp_path)
    bench = _load_script()
    rc = bench.main(["--data-dir", str(tmp_path), "--device", "cpu", "--steps", "2", "--warmup", "1",
                     "--repeats", "1", "--batch-size", "8", "--json",
                     "--variants", "baseline,enhanced,ceiling,seed_style,fused,unfused"])
    out = capsys.readouterr().out
    assert rc == 0
    result = json.loads(out)  # stdout is exactly one JSON object
    numeric = [f"{name}_img_per_s{suffix}" for suffix in ("", "_min")
               for name in ("cnnstress_baseline", "cnnstress_enhanced", "seed_style_baseline",
                            "seed_style_enhanced", "step_ceiling")]
    numeric += [f"ratio_{p}_cnnstress_vs_{ref}" for p in ("baseline", "enhanced")
                for ref in ("seed_style", "ceiling")]
    numeric += [f"cnnstress_baseline_{v}_img_per_s" for v in ("fused", "unfused")]
    numeric += [f"ratio_baseline_{v}_vs_baseline" for v in ("fused", "unfused")]
    for key in numeric:
        value = result[key]
        assert isinstance(value, (int, float)) and not isinstance(value, bool), key
        assert math.isfinite(value) and value > 0, (key, value)
    assert result["device"] == "cpu"
    assert result["precision"] in ("bf16", "fp32")
    assert result["batch_size"] == 8 and result["steps"] == 2 and result["repeats"] == 1
    assert result["train_images"] == 5 * PER_FILE
    assert result["threads"] == 1
    assert result["cnnstress_baseline_compile_img_per_s"] is None  # not asked for
    assert set(result["warmup_seconds"]) == {"step_ceiling", "cnnstress_baseline", "cnnstress_enhanced",
                                             "cnnstress_baseline_fused", "cnnstress_baseline_unfused"}
    for key in ("torch_version", "threads", "date"):
        assert result[key]


def test_benchmark_defaults_are_short_and_long_is_a_flag():
    bench = _load_script()
    short = bench.parse_args([])
    assert (short.steps, short.warmup, short.repeats, short.variants) == (4, 1, 2, None)
    assert bench.default_variants(torch.device("cpu")) == ["baseline", "enhanced", "ceiling", "fused", "compile"]
    assert "cudagraphs" in bench.default_variants(torch.device("cuda"))
    long = bench.parse_args(["--long", "--all"])
    assert (long.steps, long.warmup, long.repeats) == (30, 5, 3) and "seed_style" in long.variants
    assert bench.parse_args(["--long", "--steps", "7"]).steps == 7


def test_benchmark_unknown_variant_is_one_line(capsys):
    bench = _load_script()
    with pytest.raises(SystemExit) as exc:
        bench.parse_args(["--variants", "baseline,warp"])
    assert exc.value.code == 2 and "warp" in capsys.readouterr().err


def test_benchmark_missing_data_names_the_tool(tmp_path, capsys):
    bench = _load_script()
    rc = bench.main(["--data-dir", str(tmp_path / "nope"), "--json"])
    err = capsys.readouterr().err
    assert rc == 2
    assert "cifar10_offline.py" in err and len(err.strip().splitlines()) == 1


def test_eval_benchmark_json_smoke(tmp_path, capsys, one_thread):
    _write_fixture(tmp_path)
    bench = _load_script(EVAL_SCRIPT)
    rc = bench.main(["--data-dir", str(tmp_path), "--device", "cpu", "--images", "8", "--batch-size", "4",
                     "--cam-batch-size", "4", "--repeats", "2", "--json"])
    result = json.loads(capsys.readouterr().out)
    assert rc == 0
    for key in ("predict_img_per_s", "predict_img_per_s_min", "gradcam_img_per_s", "gradcam_img_per_s_min"):
        assert math.isfinite(result[key]) and result[key] > 0, key
    assert result["predict_img_per_s_min"] <= result["predict_img_per_s"]
    assert result["images"] == 8 and result["repeats"] == 2 and result["device"] == "cpu"


def test_stress_benchmark_json_smoke(tmp_path, capsys, one_thread):
    _write_fixture(tmp_path)
    bench = _load_script(STRESS_SCRIPT)
    rc = bench.main(["--data-dir", str(tmp_path), "--device", "cpu", "--images", "4", "--attack-images", "4",
                     "--pgd-steps", "2", "--repeats", "1", "--json"])
    result = json.loads(capsys.readouterr().out)
    assert rc == 0
    from cnnstress.robustness.corruptions import CORRUPTIONS
    assert set(result["corruption_img_per_s"]) == set(CORRUPTIONS)
    for r in [*result["corruption_img_per_s"].values(), *result["attack_img_per_s"].values()]:
        assert math.isfinite(r["median"]) and 0 < r["min"] <= r["median"]
    assert set(result["attack_img_per_s"]) == {"fgsm", "pgd2"} and result["attack_images"] == 4


if __name__ == "__main__":
    raise SystemExit(pytest.main([__file__, "-q"]))
