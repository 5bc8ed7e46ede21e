"""The stage contract: what every stage of a study provides.

A stage is one step of the study (training, failures, comparison, stress,
explanations, label review, report). It owns its computation, its cache, its
sampling (named seed streams), its figures, its one summary line, its numbers
in metrics.json and its section of the reports:

    requires                        -> names of the stages whose results it reads
    run(study, inputs, force=, show=, cached_only=) -> typed result (a results.Record)
    compute(study, inputs)          -> the result (Stage.run: compute, then figures)
    figures(study, result, inputs=, show=) -> the files drawn from the result (each
                                       figure a plots.FigureSpec: redrawn only when changed)
    summary(study, result)          -> the one line logged and printed by the CLI
    model_metrics(study, result, m) -> flat numbers merged into metrics.json[m]
    metrics(study, result)          -> metrics.json[stage.name] (None: nothing)
    sections(study, result)         -> report sections (reporting.Section)
    finding(study, result)          -> what it found, in a sentence or two for a reader
                                       (the report's summary, Study.findings())

`inputs` maps each required stage's name to its result: the Study runs what
is required (an analysis stage only from its cache) and hands it in, so no
stage runs another. A CachedStage keeps its numbers as JSON: its `run` does
cache key -> read -> compute what is missing -> write -> figures.

Adding a stage means one module defining a `Stage` subclass and one line in
`cnnstress.stages.STAGES`.
"""
from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any, Callable, Mapping, Protocol

import numpy as np

from ..errors import ResultFormatError
from ..io import ensure_writable_dir, read_json_cache, save_json
from ..plots import write_figure
from ..results import Record

if TYPE_CHECKING:
    from pathlib import Path

    from ..config import Config
    from ..data import CifarSplits
    from ..runlog import StageTimer


class StudyContext(Protocol):
    """What a stage may use of the study running it (cnnstress.study.Study
    provides it; the study sits above the stages, which never import it)."""

    config: "Config"
    out: "Path"
    models: tuple[str, ...]           # the models' names, in order
    weights: "Path | None"            # published-weights folder, or None
    allow_training: bool
    progress: bool | None
    log: Callable[[str], None] | None
    timer: "StageTimer"
    budget: Any                       # cnnstress.budget.TimeBudget or None
    started: float                    # time.perf_counter() at the start
    trained: dict[str, Any]           # the training stage's models (stages.training.Trained)
    stage_list: list                  # the stages, in order

    @property
    def splits(self) -> "CifarSplits": ...
    def say(self, message: str) -> None: ...
    def model(self, name: str) -> Any: ...
    def model_stamp(self, name: str) -> str: ...
    def model_config(self, name: str) -> "Config": ...
    def recall(self, slot: str, key: tuple) -> Any: ...          # a stage's per-model steps, kept with
    def keep(self, slot: str, key: tuple, value: Any) -> Any: ...  # what they were made from


class Stage:
    """Base class of a study stage; subclasses set `name`/`title`/`requires`,
    implement `compute` (or override `run`) and whichever of the report hooks
    they have something for."""

    name: str = ""              # key in study.results and in metrics.json
    title: str = ""             # the stage's report section title
    requires: tuple[str, ...] = ()   # stages whose results `run` is handed (inputs[name])
    config_groups: tuple[str, ...] = ()   # Config field groups its cached numbers depend on
    version: int = 1            # bump when the cached numbers change meaning
    enabled_by: str | None = None  # a bool Config field switching the stage off in `run`
    analysis: bool = False      # an optional analysis: run(..., cached_only=True) returns None unless cached
    banner: str = ""            # an analysis stage's "== ... ==" line in the run's log (default: its title)

    def requirements(self, study: StudyContext) -> tuple[str, ...]:
        """The stages whose results `run` is handed: `requires` (the report overrides it)."""
        return self.requires

    def enabled(self, study: StudyContext) -> bool:
        return self.enabled_by is None or bool(getattr(study.config, self.enabled_by))

    def run(self, study: StudyContext, inputs: Mapping[str, Any], *, force: bool = False, show: bool = False,
            cached_only: bool = False) -> Record | None:
        """The stage's result: compute it, draw its figures, time it. An
        analysis stage returns None when cached_only and nothing is cached."""
        result = self.compute(study, inputs)
        self.figures(study, result, inputs=inputs, show=show)
        self.lap(study, result)
        return result

    def compute(self, study: StudyContext, inputs: Mapping[str, Any]) -> Record:
        raise NotImplementedError

    def figures(self, study: StudyContext, result: Any, *, inputs: Mapping[str, Any] | None = None,
                show: bool = False) -> list:
        """Draw and save the stage's figures (and other files made from the result); their paths."""
        return []

    def lap(self, study: StudyContext, result: Any) -> None:
        """Record the stage's time (study.timer.lap)."""

    def summary(self, study: StudyContext, result: Any) -> str | None:
        return None

    def model_metrics(self, study: StudyContext, result: Any, model: str) -> dict[str, Any]:
        return {}

    def metrics(self, study: StudyContext, result: Any) -> dict[str, Any] | None:
        return None

    def sections(self, study: StudyContext, result: Any) -> list:
        return []

    def finding(self, study: StudyContext, result: Any) -> str | None:
        """What the stage found, as plain sentences built from `result` (None: nothing to say)."""
        return None

    # --- caching -----------------------------------------------------------
    def settings(self, study: StudyContext) -> dict[str, Any]:
        """What the stage's numbers depend on besides the models and the test
        images: its version, the seed and every Config field of its groups,
        so a new field in a group invalidates the cache by itself."""
        return {"version": self.version, "seed": study.config.seed,
                **study.config.settings(*self.config_groups)}

    def cache_key(self, study: StudyContext, models: tuple[str, ...] | None = None) -> dict[str, Any]:
        names = study.models if models is None else models
        # As it reads back from JSON (tuples become lists), so a cached key compares equal.
        return json_roundtrip({"stage": self.name, "models": {n: study.model_stamp(n) for n in names},
                               "test_indices": np.asarray(study.splits.test.indices).tolist(),
                               "settings": self.settings(study)})

    def read_cache(self, study: StudyContext, path: "Path", key: dict[str, Any], result_type: type[Record],
                   check: Callable[[Any], str | None] | None = None) -> Record | None:
        """The cached result at `path` when its key is `key`, it reads as
        `result_type` and `check(result)` finds no problem; None otherwise (a
        malformed file is logged: recomputed)."""
        if not all(key["models"].values()):  # a model without a stable identity is never cached
            return None
        return load_cached(path, key, result_type, check, study.say)

    def write_cache(self, study: StudyContext, path: "Path", key: dict[str, Any], result: Record) -> None:
        if all(key["models"].values()):
            save_json(path, {"key": key, "results": result.to_dict()})


def load_cached(path: "Path", key: dict[str, Any], result_type: type[Record],
                check: Callable[[Any], str | None] | None = None,
                log: Callable[[str], None] | None = None) -> Record | None:
    """A JSON cache's result as `result_type` when its key is `key` and it
    makes sense (the Record's types and ranges, then `check`); None otherwise,
    a malformed file logged in one line (the stage recomputes)."""
    results = read_json_cache(path, key, log)
    if results is None:
        return None
    try:
        result = result_type.from_dict(results, "results")
        problem = check(result) if check is not None else None
    except ResultFormatError as exc:
        problem = str(exc)
    if problem is None:
        return result
    if log:
        log(f"{path.name}: not a valid cache ({problem}); recomputing")
    return None


def json_roundtrip(value: Any) -> Any:
    """`value` as it reads back from JSON (tuples become lists, NaN stays)."""
    return json.loads(json.dumps(value))


def save_figures(figures: dict, out: "Path", *, show: bool = False) -> list:
    """Write {file name: plots.FigureSpec} under `out`, each drawn only when
    its file was drawn from something else (plots.write_figure); show:
    display each file in a notebook. Returns the paths."""
    return [write_figure(spec, out / filename, show=show) for filename, spec in figures.items()]


class CachedStage(Stage):
    """A stage whose numbers are cached as JSON, one file per unit (a model,
    or the whole stage): `run` reads each unit's cache when its key matches,
    computes the missing units, writes them, assembles the result and draws
    the figures. Subclasses implement cache_units, unit_key, compute_units
    and assemble."""

    unit_type: type[Record] = Record
    command: str = ""           # the CLI command that computes it (named when nothing is cached)

    def cache_units(self, study: StudyContext) -> dict[str, "Path"]:
        """{unit: its cache file}, in order."""
        raise NotImplementedError

    def unit_key(self, study: StudyContext, unit: str) -> dict[str, Any]:
        return self.cache_key(study)

    def unit_problem(self, study: StudyContext, result: Any) -> str | None:
        """What a cached unit lacks that its readers need, beyond its Record's
        types and ranges (every corruption type, positions inside the test
        split, ...): one line, or None when it fits."""
        return None

    def compute_units(self, study: StudyContext, inputs: Mapping[str, Any], units: list[str]) -> dict[str, Record]:
        """The results of `units` (those not cached), {unit: unit_type}."""
        raise NotImplementedError

    def assemble(self, study: StudyContext, inputs: Mapping[str, Any], parts: dict[str, Record]) -> Record:
        """The stage's result from every unit's (cached or computed) result."""
        raise NotImplementedError

    def lap_units(self, study: StudyContext, computed: list[str]) -> None:
        """Record the stage's time; `computed`: the units computed (not read)."""

    def run(self, study: StudyContext, inputs: Mapping[str, Any], *, force: bool = False, show: bool = False,
            cached_only: bool = False) -> Record | None:
        ensure_writable_dir(study.out)
        units = self.cache_units(study)
        keys = {u: self.unit_key(study, u) for u in units}
        parts: dict[str, Record] = {}
        if not force:
            for unit, path in units.items():
                cached = self.read_cache(study, path, keys[unit], self.unit_type,
                                         lambda result: self.unit_problem(study, result))
                if cached is not None:
                    parts[unit] = cached
                    study.say(f"{self.name}: reusing {path}")
        todo = [u for u in units if u not in parts]
        if todo and cached_only:
            study.say(f"{self.name}: no cached results match these models and settings; "
                      f"`python -m cnnstress {self.command}` computes them")
            return None
        if todo:
            for unit, result in self.compute_units(study, inputs, todo).items():
                self.write_cache(study, units[unit], keys[unit], result)
                parts[unit] = result
        result = self.assemble(study, inputs, {u: parts[u] for u in units})
        self.figures(study, result, inputs=inputs, show=show)
        self.lap_units(study, todo)
        return result
