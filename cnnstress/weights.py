"""Published weights: export a finished run's two models as small, hashed,
weight-only files, and load them back safely for analysis without training.

A published folder holds, per model, the state_dict's tensors in bf16 (or
fp16; integer buffers such as BatchNorm's num_batches_tracked keep their
dtype) split into shards of at most `max_bytes` each, plus

    weights.json   format, architecture, and per model: config, history,
                   epochs, shard names, dtype, the run's reported test
                   numbers (from metrics.json) for comparison
    SHA256SUMS     `sha256sum -c`-compatible hashes of every other file

Loading verifies every hash before reading anything, reads shards with
``torch.load(weights_only=True)`` (plain dicts of tensors, no code), and checks
the training config against a named profile and the architecture.
"""
from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .checkpoint import malformed_history, malformed_weights, read_checkpoint
from .config import Config, get_config
from .data import NUM_CLASSES
from .errors import CheckpointError
from .io import atomic_write, save_json
from .model import ARCH, resnet18_for
from .registry import MODEL_NAMES, checkpoint_path

FORMAT_VERSION = 1
METADATA_FILE = "weights.json"
SUMS_FILE = "SHA256SUMS"
MAX_BYTES = 16 * 2**20
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}
_SHARD_OVERHEAD = 64 * 1024                   # zip/pickle framing per shard, an upper bound
_TENSOR_OVERHEAD = 1024                       # per tensor record and its key


@dataclass
class PublishedModel:
    """One published model, ready for analysis."""
    name: str
    model: nn.Module                  # fp32, eval mode, on the requested device
    config: Config                    # the config it was trained with (as saved)
    history: list[dict[str, float]]   # per-epoch training/validation numbers
    epochs: int
    stamp: str                        # stable identity: SHA-256 over its shards' hashes
    files: list[Path] = field(default_factory=list)
    reference: dict[str, Any] | None = None   # the source run's test numbers (metrics.json), if recorded


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _publishable(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Floating tensors cast to `dtype`; integer buffers kept as they are."""
    t = tensor.detach().cpu()
    if t.is_floating_point():
        t = t.to(dtype)
    return t.contiguous().clone()   # clone: a view would save its whole storage


def _serialize(tensors: dict[str, torch.Tensor]) -> bytes:
    buf = io.BytesIO()
    torch.save(tensors, buf)
    return buf.getvalue()


def _pack(tensors: dict[str, torch.Tensor], max_bytes: int) -> list[bytes]:
    """Serialized shards, in state_dict order, each at most max_bytes."""
    budget = max_bytes - _SHARD_OVERHEAD
    groups: list[list[str]] = [[]]
    used = 0
    for key, t in tensors.items():
        size = t.numel() * t.element_size() + _TENSOR_OVERHEAD
        if size > budget:
            raise ValueError(f"tensor {key} takes {size} bytes, more than a shard may hold "
                             f"({max_bytes} bytes with framing); raise max_bytes")
        if used + size > budget and groups[-1]:
            groups.append([])
            used = 0
        groups[-1].append(key)
        used += size
    shards = []
    for keys in groups:
        data = _serialize({k: tensors[k] for k in keys})
        if len(data) > max_bytes:   # the framing estimate was wrong: never write an oversized file
            raise ValueError(f"a shard serialized to {len(data)} bytes > max_bytes {max_bytes}")
        shards.append(data)
    return shards


def _reference_numbers(out_dir: Path) -> dict[str, dict[str, Any]]:
    """Per model, the run's reported test accuracy and failure count (metrics.json), if present."""
    try:
        metrics = json.loads((out_dir / "metrics.json").read_text())
    except (OSError, ValueError, RecursionError):
        return {}
    keep = ("test_accuracy", "n", "high_confidence_failures", "threshold", "loss")
    refs = {}
    for name in MODEL_NAMES:
        m = metrics.get(name) if isinstance(metrics, dict) else None
        if isinstance(m, dict) and "test_accuracy" in m:
            refs[name] = {k: m[k] for k in keep if k in m}
            refs[name]["hardware"] = metrics.get("hardware")
            refs[name]["precision"] = (metrics.get("config") or {}).get("precision")
    return refs


def export_weights(out_dir: str | Path, dest: str | Path, *, dtype: torch.dtype = torch.bfloat16,
                   max_bytes: int = MAX_BYTES) -> list[Path]:
    """Write the baseline and improved models of the run in `out_dir` as
    published weights into `dest` (shards, weights.json, SHA256SUMS).
    Returns the paths written. Every file is written atomically and
    SHA256SUMS last, so a partial export fails verification."""
    dtype_name = {v: k for k, v in DTYPES.items()}.get(dtype)
    if dtype_name is None:
        raise ValueError(f"dtype must be torch.bfloat16 or torch.float16, got {dtype}")
    out_dir, dest = Path(out_dir), Path(dest)
    if dest.resolve() == out_dir.resolve():
        raise ValueError("publish into another folder than the run's output folder")
    refs = _reference_numbers(out_dir)
    meta: dict[str, Any] = {"format": FORMAT_VERSION, "arch": ARCH, "num_classes": NUM_CLASSES,
                            "dtype": dtype_name, "max_bytes": max_bytes, "models": {}}
    shards_by_model: dict[str, list[bytes]] = {}
    for name in MODEL_NAMES:
        path = checkpoint_path(out_dir, name)
        ckpt = read_checkpoint(path)
        config = Config.from_dict(ckpt["config"])
        if not ckpt.get("finished", int(ckpt["epoch"]) >= config.epochs):
            raise CheckpointError(f"{path} is unfinished ({ckpt['epoch']}/{config.epochs} epochs); "
                                  "finish training before publishing")
        tensors = {k: _publishable(v, dtype) for k, v in ckpt["model"].items()}
        shards_by_model[name] = _pack(tensors, max_bytes)
        count = len(shards_by_model[name])
        meta["models"][name] = {
            "config": config.to_dict(), "history": ckpt["history"], "epochs": int(ckpt["epoch"]),
            "shards": [f"{name}-{i + 1:05d}-of-{count:05d}.pt" for i in range(count)],
            "dtype": dtype_name, "parameters": sum(t.numel() for k, t in tensors.items()
                                                   if t.is_floating_point()),
            "source": {"checkpoint_format": ckpt.get("format"), "checkpoint_sha256": sha256_file(path)},
            "reference": refs.get(name),
        }
    dest.mkdir(parents=True, exist_ok=True)
    (dest / SUMS_FILE).unlink(missing_ok=True)   # stale sums must not vouch for a half-written export
    written = []
    for name, shards in shards_by_model.items():
        for filename, data in zip(meta["models"][name]["shards"], shards):
            atomic_write(dest / filename, lambda tmp, data=data: tmp.write_bytes(data))
            written.append(dest / filename)
    save_json(dest / METADATA_FILE, meta)
    written.append(dest / METADATA_FILE)
    sums = "".join(f"{sha256_file(p)}  {p.name}\n" for p in written)
    atomic_write(dest / SUMS_FILE, lambda tmp: tmp.write_text(sums))
    return written + [dest / SUMS_FILE]


MAX_METADATA_BYTES = 4 * 2**20   # weights.json and SHA256SUMS are a few kilobytes


def _read_small(path: Path, fix: str) -> str:
    """A metadata file's text; one far larger than any we write, or not text, is refused unread."""
    try:
        if path.stat().st_size > MAX_METADATA_BYTES:
            raise CheckpointError(f"{path} is {path.stat().st_size >> 20} MB, far more than published metadata; "
                                  f"{fix}")
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path} cannot be read ({getattr(exc, 'strerror', None) or type(exc).__name__}); "
                              f"{fix}") from None


def verify_published(dest: str | Path) -> dict[str, str]:
    """Check every file listed in SHA256SUMS against its hash; {file name: sha256}.
    Raises CheckpointError (one line) naming the first missing or altered file."""
    dest = Path(dest)
    sums_path = dest / SUMS_FILE
    fix = f"restore the published files in {dest} (e.g. git checkout -- {dest}) or export them again"
    if not sums_path.is_file():
        raise CheckpointError(f"{sums_path} not found: {dest} holds no published weights; {fix}")
    sums: dict[str, str] = {}
    for line in _read_small(sums_path, fix).splitlines():
        parts = line.strip().split(maxsplit=1)
        if not parts:
            continue
        if len(parts) != 2 or len(parts[0]) != 64 or "/" in parts[1] or parts[1].startswith("."):
            raise CheckpointError(f"{sums_path} has a malformed line {line.strip()!r}; {fix}")
        sums[parts[1].lstrip("*")] = parts[0].lower()
    if METADATA_FILE not in sums:
        raise CheckpointError(f"{sums_path} does not list {METADATA_FILE}; {fix}")
    for filename, expected in sums.items():
        path = dest / filename
        if not path.is_file():
            raise CheckpointError(f"published file {path} is missing; {fix}")
        if sha256_file(path) != expected:
            raise CheckpointError(f"published file {path} does not match its SHA-256 in {SUMS_FILE} "
                                  f"(altered or truncated); {fix}")
    return sums


def check_profile(saved: Config, profile: str, where: str | Path) -> None:
    """Raise CheckpointError when `saved`'s training fields differ from `profile`'s
    (with saved's augmentation preset)."""
    wanted = get_config(profile).replace(augment=saved.augment).training_key()
    have = saved.training_key()
    diff = {k: (have.get(k), v) for k, v in wanted.items() if have.get(k) != v}
    if diff:
        shown = ", ".join(f"{k}: published {a!r} vs {profile} {b!r}" for k, (a, b) in sorted(diff.items()))
        raise CheckpointError(f"{where} was not trained with the {profile} profile ({shown}); "
                              f"publish weights of a {profile} run or name their profile with --profile")


def check_published(dest: str | Path, *, expect_profile: str | None = "full"
                    ) -> tuple[dict[str, str], dict[str, tuple[dict[str, Any], Config]]]:
    """Verify a published folder without loading its tensors: every hash, the
    metadata's format and architecture, and (unless None) that both models'
    training config is `expect_profile`'s. Returns ({file: sha256},
    {model name: (metadata entry, Config)}); raises one-line CheckpointErrors."""
    dest = Path(dest)
    sums = verify_published(dest)
    meta_path = dest / METADATA_FILE
    try:
        meta = json.loads(_read_small(meta_path, "export the weights again"))
    except (ValueError, RecursionError) as exc:
        raise CheckpointError(f"{meta_path} is not valid JSON ({exc}); export the weights again") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_VERSION:
        raise CheckpointError(f"{meta_path} has format {meta.get('format') if isinstance(meta, dict) else None!r}, "
                              f"expected {FORMAT_VERSION}; export the weights again with this version")
    if meta.get("arch") != ARCH or meta.get("num_classes") != NUM_CLASSES:
        raise CheckpointError(f"{meta_path} holds {meta.get('arch')!r} with {meta.get('num_classes')} classes, "
                              f"expected {ARCH!r} with {NUM_CLASSES}; these are not CIFAR-10 ResNet-18 weights")
    models = meta.get("models") or {}
    missing = [n for n in MODEL_NAMES if n not in models]
    if missing:
        raise CheckpointError(f"{meta_path} lacks the {missing[0]} model; export both models of a run")
    checked = {}
    for name in MODEL_NAMES:
        entry = models[name]
        problem = _malformed_entry(entry, sums)
        if problem:
            raise CheckpointError(f"{meta_path}: the {name} model's {problem}; export the weights again") from None
        try:
            config = Config.from_dict(entry["config"])
        except Exception as exc:
            raise CheckpointError(f"{meta_path}: the {name} config is invalid ({str(exc).splitlines()[0]}); "
                                  "export the weights again") from None
        if expect_profile is not None:
            check_profile(config, expect_profile, f"{dest} ({name})")
        checked[name] = (entry, config)
    return sums, checked


def _malformed_entry(entry: Any, sums: dict[str, str]) -> str | None:
    """None when a model's weights.json entry has what the readers use (its
    shards listed in SHA256SUMS, whole epochs, a per-epoch history, reference
    numbers that are numbers), else what is wrong (a phrase)."""
    if not isinstance(entry, dict):
        return f"entry is a {type(entry).__name__}, expected an object"
    if not isinstance(entry.get("config"), dict):
        return "config is missing"
    epochs = entry.get("epochs")
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        return f"epochs is {epochs!r}, expected a whole number >= 1"
    shards = entry.get("shards")
    if not isinstance(shards, list) or not shards or not all(isinstance(s, str) for s in shards):
        return "shards are not a list of file names"
    unlisted = [s for s in shards if s not in sums]
    if unlisted:
        return f"shard {unlisted[0]!r} is not listed in {SUMS_FILE}"
    history = entry.get("history")
    problem = malformed_history(history, epochs)
    if problem:
        return problem
    if len(history) != epochs:
        return f"history has {len(history)} epochs, not {epochs}"
    ref = entry.get("reference")
    if ref is not None:
        if not isinstance(ref, dict):
            return f"reference is a {type(ref).__name__}, expected an object or null"
        acc, n = ref.get("test_accuracy"), ref.get("n")
        if isinstance(acc, bool) or not isinstance(acc, (int, float)) or not 0 <= acc <= 1:
            return f"reference test_accuracy is {acc!r}, expected a fraction in [0, 1]"
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            return f"reference n is {n!r}, expected a whole number"
    return None


def _published_state(dest: Path, name: str, sums: dict[str, str], entry: dict) -> tuple[dict, str]:
    """Model `name`'s state_dict from its verified shards, and its stamp
    ("sha256:" + SHA-256 over its shards' hashes)."""
    unlisted = [s for s in entry["shards"] if s not in sums]
    if unlisted:
        raise CheckpointError(f"shard {dest / unlisted[0]} is not listed in {SUMS_FILE}; export the weights again")
    state: dict[str, torch.Tensor] = {}
    for shard in entry["shards"]:
        try:
            part = torch.load(dest / shard, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise CheckpointError(f"published shard {dest / shard} cannot be read safely "
                                  f"({type(exc).__name__}); export the weights again") from None
        if not isinstance(part, dict) or not all(isinstance(v, torch.Tensor) for v in part.values()):
            raise CheckpointError(f"published shard {dest / shard} is not a dict of tensors; export again")
        state.update(part)
    problem = malformed_weights(state)
    if problem:
        raise CheckpointError(f"published weights {name} in {dest} are unusable ({problem}); "
                              "export them again from a good run")
    stamp = hashlib.sha256("".join(sums[s] for s in entry["shards"]).encode()).hexdigest()
    return state, f"sha256:{stamp}"


def published_state(dest: str | Path, name: str) -> tuple[dict[str, torch.Tensor], str]:
    """Model `name`'s weights from a published folder (hashes verified, any
    profile), as a state_dict of the stored dtype, and its stamp."""
    dest = Path(dest)
    sums, models = check_published(dest, expect_profile=None)
    if name not in models:
        raise CheckpointError(f"{dest} publishes no model {name!r}; it has {', '.join(models)} (pass --name)")
    return _published_state(dest, name, sums, models[name][0])


def load_published(dest: str | Path, *, expect_profile: str | None = "full", device: torch.device | str = "cpu",
                   names: tuple[str, ...] = MODEL_NAMES) -> dict[str, PublishedModel]:
    """{"baseline": ..., "improved": ...} (or just `names`) from a published
    folder. Every hash is verified first; the saved training config must be
    `expect_profile`'s (None: any). Models are fp32 in eval mode on `device`."""
    dest = Path(dest)
    sums, models = check_published(dest, expect_profile=expect_profile)
    loaded = {}
    for name in names:
        entry, config = models[name]
        state, stamp = _published_state(dest, name, sums, entry)
        model = resnet18_for(config, NUM_CLASSES)
        try:
            model.load_state_dict(state)   # strict; copies into fp32 parameters
        except RuntimeError as exc:
            raise CheckpointError(f"published weights {name} in {dest} do not fit a CIFAR ResNet-18 "
                                  f"({str(exc).splitlines()[0]}); export them again") from None
        model = model.to(device)
        if config.channels_last:
            model = model.to(memory_format=torch.channels_last)
        loaded[name] = PublishedModel(name=name, model=model.eval(), config=config,
                                      history=list(entry.get("history") or []), epochs=int(entry["epochs"]),
                                      stamp=stamp, files=[dest / s for s in entry["shards"]],
                                      reference=entry.get("reference"))
    return loaded


# Analysis sizes for published weights on a CPU (`run --weights`): each caps the
# profile's value (None = all images counts as above any cap). Sized so the whole
# command stays within 10 minutes on 2 CPU cores (README, "Published weights").
CPU_ANALYSIS = {"corruption_subset": 64, "adv_subset": 64, "faithfulness_samples": 32, "sanity_samples": 16}


def analysis_config(profile: str = "full", **overrides: Any) -> Config:
    """The config for analysing published `profile` weights: that profile's
    training fields, the whole test set, and CPU-sized analysis samples
    (CPU_ANALYSIS caps); `overrides` (None values ignored) come last."""
    base = get_config(profile)
    capped = {k: cap if getattr(base, k) is None else min(cap, getattr(base, k)) for k, cap in CPU_ANALYSIS.items()}
    return base.replace(**{"test_subset": None, **capped, **{k: v for k, v in overrides.items() if v is not None}})


def describe_reference(reference: dict[str, Any] | None, summary: dict[str, Any], where: str) -> str | None:
    """One line setting the published run's test accuracy and failure count
    beside the ones recomputed now (`summary` from evaluate.summarize)."""
    if not reference:
        return None
    acc, ref_acc = summary["test_accuracy"], reference.get("test_accuracy")
    n, ref_n = summary["n"], reference.get("n")
    line = (f"published run ({reference.get('hardware') or 'unknown hardware'}, precision "
            f"{reference.get('precision')}): test accuracy {100 * ref_acc:.2f}% on {ref_n} images, "
            f"{reference.get('high_confidence_failures')} failures above {reference.get('threshold')}; "
            f"recomputed here ({where}): {100 * acc:.2f}% on {n}, {summary['high_confidence_failures']} "
            f"failures above {summary['threshold']}")
    if ref_n == n and ref_acc is not None:
        line += f" (accuracy differs by {round(abs(acc - ref_acc) * n)} images)"
    return line
