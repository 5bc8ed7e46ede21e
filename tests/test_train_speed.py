"""The speed switches of the training step learn the same thing: fused Adam is
torch's Adam (L2 weight decay included) and resumes across implementations;
a compile mode that fails falls back to the eager step."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from cnnstress.config import Config, get_config
from cnnstress.errors import ConfigError
from cnnstress.train import build_optimizer, load_optimizer_state, make_step, use_fused_adam


def _tiny_model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
                               torch.nn.Flatten(), torch.nn.Linear(4 * 6 * 6, 10))


def _batch(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(6, 3, 8, 8, generator=g), torch.randint(0, 10, (6,), generator=g)


def _train(model, optimizer, steps: int, start: int = 0) -> None:
    for i in range(start, start + steps):
        x, y = _batch(i)
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()


def _adam_reference(model, config: Config, steps: int) -> list[torch.Tensor]:
    """Adam with L2 weight decay written out (Kingma & Ba; torch's decay adds wd*p to the gradient)."""
    b1, b2, eps = 0.9, 0.999, 1e-8
    params = list(model.parameters())
    m = [torch.zeros_like(p) for p in params]
    v = [torch.zeros_like(p) for p in params]
    for t in range(1, steps + 1):
        x, y = _batch(t - 1)
        model.zero_grad()
        F.cross_entropy(model(x), y).backward()
        with torch.no_grad():
            for p, mi, vi in zip(params, m, v):
                g = p.grad + config.weight_decay * p
                mi.mul_(b1).add_(g, alpha=1 - b1)
                vi.mul_(b2).addcmul_(g, g, value=1 - b2)
                denom = (vi / (1 - b2 ** t)).sqrt() + eps
                p.sub_(config.lr * (mi / (1 - b1 ** t)) / denom)
    return [p.detach().clone() for p in params]


def test_fused_adam_is_torch_adam_with_the_same_weight_decay():
    config = Config(weight_decay=0.05, fused_adam="on")   # a large decay, so a wrong decay would show
    results = {}
    for impl in ("on", "off"):
        model = _tiny_model()
        optimizer, _ = build_optimizer(model, config.replace(fused_adam=impl))
        assert optimizer.param_groups[0].get("fused") is (True if impl == "on" else None)
        _train(model, optimizer, 5)
        results[impl] = [p.detach().clone() for p in model.parameters()]
    reference = _adam_reference(_tiny_model(), config, 5)
    for fused, plain, ref in zip(results["on"], results["off"], reference):
        torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(plain, ref, rtol=1e-5, atol=1e-6)


def test_fused_adam_default_is_cuda_only():
    assert use_fused_adam(Config(), torch.device("cuda")) is True
    assert use_fused_adam(Config(), torch.device("cpu")) is False
    assert use_fused_adam(Config(fused_adam="on"), torch.device("cpu")) is True
    assert use_fused_adam(Config(fused_adam="off"), torch.device("cuda")) is False
    with pytest.raises(ConfigError, match="fused_adam"):
        Config(fused_adam="maybe")


@pytest.mark.parametrize("saved, resumed", [("off", "on"), ("on", "off")])
def test_adam_state_resumes_across_implementations(saved, resumed):
    """A checkpoint from a fused run continues unfused (and back) as the
    uninterrupted run would, and keeps the resuming run's implementation."""
    config = Config(weight_decay=1e-2)
    straight = _tiny_model()
    opt, _ = build_optimizer(straight, config.replace(fused_adam=resumed))
    _train(straight, opt, 6)

    first = _tiny_model()
    opt1, _ = build_optimizer(first, config.replace(fused_adam=saved))
    _train(first, opt1, 3)
    state = opt1.state_dict()
    second = _tiny_model(seed=99)
    second.load_state_dict(first.state_dict())
    opt2, _ = build_optimizer(second, config.replace(fused_adam=resumed))
    load_optimizer_state(opt2, state)
    assert opt2.param_groups[0].get("fused") is (True if resumed == "on" else None)
    assert all(s["step"].dtype == torch.float32 for s in opt2.state.values())
    _train(second, opt2, 3, start=3)
    for a, b in zip(straight.parameters(), second.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_compile_mode_names_and_old_switch():
    assert Config(compile=True).compile == "default" and Config(compile=False).compile == "off"
    assert Config.from_dict({**Config().to_dict(), "compile": True}).compile == "default"
    assert get_config("smoke", compile="reduce-overhead").compile == "reduce-overhead"
    assert "compile" not in Config().training_key() and "fused_adam" not in Config().training_key()
    with pytest.raises(ConfigError, match="compile mode"):
        Config(compile="fast")


def test_failed_compile_falls_back_to_the_eager_step(monkeypatch):
    """A compile that breaks at the first call (as on a torch without a
    working backend) logs once and gives exactly the eager step's result."""
    calls = []

    def broken_compile(model, **kwargs):
        calls.append(kwargs)

        def run(x):
            raise RuntimeError("backend compiler failed\nlong traceback")
        return run

    monkeypatch.setattr(torch, "compile", broken_compile)
    results = {}
    for mode in ("off", "reduce-overhead"):
        model = _tiny_model()
        optimizer, _ = build_optimizer(model, Config())
        logs: list[str] = []
        step = make_step(model, optimizer, torch.device("cpu"), None, mode, log=logs.append)
        out = [step(*_batch(i)) for i in range(3)]
        results[mode] = ([p.detach().clone() for p in model.parameters()], out, logs)
    eager, compiled = results["off"], results["reduce-overhead"]
    assert calls == [{"mode": "reduce-overhead", "dynamic": False}]
    assert eager[2] == [] and len(compiled[2]) == 1
    assert compiled[2][0].startswith("torch.compile (mode reduce-overhead) failed, training eagerly instead: "
                                     "RuntimeError: backend compiler failed")
    for a, b in zip(eager[0], compiled[0]):
        assert torch.equal(a, b)
    for (la, ca), (lb, cb) in zip(eager[1], compiled[1]):
        assert torch.equal(la, lb) and torch.equal(ca, cb)


def test_checkpoint_every_writes_on_schedule_and_at_the_end(shared_cifar_dir, tmp_path, monkeypatch):
    """checkpoint_every=2 over 3 epochs writes after epochs 2 and 3; a run
    stopped early still writes its last epoch, and resuming from it gives the
    uninterrupted run's weights (CPU: bit-identical)."""
    import cnnstress.train as train_module
    from cnnstress.checkpoint import read_checkpoint
    from cnnstress.data import load_splits
    from cnnstress.train import fit

    cfg = get_config("smoke", val_size=50, train_subset=64, device="cpu", batch_size=32, epochs=3,
                     precision="fp32", checkpoint_every=2)
    splits = load_splits(shared_cifar_dir, cfg, download=False)
    written: list[int] = []
    real_save = train_module.save_checkpoint
    monkeypatch.setattr(train_module, "save_checkpoint",
                        lambda path, ckpt: (written.append(ckpt["epoch"]), real_save(path, ckpt)))
    whole = fit(cfg, splits, checkpoint_path=tmp_path / "a.pt", log=None)
    assert written == [2, 3]
    written.clear()
    fit(cfg, splits, checkpoint_path=tmp_path / "b.pt", log=None, stop_after_epoch=1)
    assert written == [1] and read_checkpoint(tmp_path / "b.pt")["epoch"] == 1
    resumed = fit(cfg, splits, checkpoint_path=tmp_path / "b.pt", resume=True, log=None)
    assert written == [1, 2, 3]
    for a, b in zip(whole.model.state_dict().values(), resumed.model.state_dict().values()):
        assert torch.equal(a, b)
    with pytest.raises(ConfigError, match="checkpoint_every"):
        Config(checkpoint_every=0)
