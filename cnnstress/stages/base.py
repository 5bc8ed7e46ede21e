"""The stage contract: what every stage of a study provides.

A stage is one step of the study (training, failures, comparison, stress,
explanations, report). It owns its computation's orchestration, its cache,
its sampling (named seed streams), its figures, its one summary line, its
numbers in metrics.json and its section of the reports:

    run(study, force=False, show=False) -> typed result   (a results.Record)
    summary(study, result)          -> the one line logged and printed by the CLI
    model_metrics(study, result, m) -> flat numbers merged into metrics.json[m]
    metrics(study, result)          -> metrics.json[stage.name] (None: nothing)
    sections(study, result)         -> report sections (reporting.Section)
    finding(study, result)          -> what it found, in a sentence or two for a reader
                                       (the report's summary, Study.findings())

Adding a stage means one module defining a `Stage` subclass and one line in
`cnnstress.stages.STAGES`.
"""
from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

import matplotlib.pyplot as plt
import numpy as np

from ..errors import ResultFormatError
from ..io import save_json
from ..plots import save_figure
from ..results import Record
from ..schema import read_cache

if TYPE_CHECKING:  # the Study imports the stages; the stages only take one
    from pathlib import Path

    from ..study import Study

class Stage:
    """Base class of a study stage; subclasses set `name`/`title` and override
    `run` and whichever of the report hooks they have something for."""

    name: str = ""              # key in study.results and in metrics.json
    title: str = ""             # the stage's report section title
    config_groups: tuple[str, ...] = ()   # Config field groups its cached numbers depend on
    version: int = 1            # bump when the cached numbers change meaning
    enabled_by: str | None = None  # a bool Config field switching the stage off in `run`
    analysis: bool = False      # an optional analysis: run(..., cached_only=True) returns None unless cached
    banner: str = ""            # an analysis stage's "== ... ==" line in the run's log (default: its title)

    def enabled(self, study: "Study") -> bool:
        return self.enabled_by is None or bool(getattr(study.config, self.enabled_by))

    def run(self, study: "Study", *, force: bool = False, show: bool = False) -> Record:
        raise NotImplementedError

    def summary(self, study: "Study", result: Any) -> str | None:
        return None

    def model_metrics(self, study: "Study", result: Any, model: str) -> dict[str, Any]:
        return {}

    def metrics(self, study: "Study", result: Any) -> dict[str, Any] | None:
        return None

    def sections(self, study: "Study", result: Any) -> list:
        return []

    def finding(self, study: "Study", result: Any) -> str | None:
        """What the stage found, as plain sentences built from `result` (None: nothing to say)."""
        return None

    # --- caching -----------------------------------------------------------
    def settings(self, study: "Study") -> dict[str, Any]:
        """What the stage's numbers depend on besides the models and the test
        images: its version, the seed and every Config field of its groups,
        so a new field in a group invalidates the cache by itself."""
        return {"version": self.version, "seed": study.config.seed,
                **study.config.settings(*self.config_groups)}

    def cache_key(self, study: "Study", models: tuple[str, ...] | None = None) -> dict[str, Any]:
        names = study.models if models is None else models
        # As it reads back from JSON (tuples become lists), so a cached key compares equal.
        return json_roundtrip({"stage": self.name, "models": {n: study.model_stamp(n) for n in names},
                               "test_indices": np.asarray(study.splits.test.indices).tolist(),
                               "settings": self.settings(study)})

    def read_cache(self, study: "Study", path: "Path", key: dict[str, Any], result_type: type[Record],
                   schema: Any = None) -> Record | None:
        """The cached result at `path` when its key is `key` and it parses as
        `result_type`; None otherwise (a malformed file is logged: recomputed)."""

        if not all(key["models"].values()):  # a model without a stable identity is never cached
            return None
        cached = read_cache(path, key, schema, study.say)
        if cached is None:
            return None
        try:
            return result_type.from_dict(cached)
        except ResultFormatError as exc:
            study.say(f"{path.name}: not a valid cache ({exc}); recomputing")
            return None

    def write_cache(self, study: "Study", path: "Path", key: dict[str, Any], result: Record) -> None:
        if all(key["models"].values()):
            save_json(path, {"key": key, "results": result.to_dict()})


def json_roundtrip(value: Any) -> Any:
    """`value` as it reads back from JSON (tuples become lists, NaN stays)."""
    return json.loads(json.dumps(value))


def save_figures(figures: dict, out: "Path", *, save: bool = True, show: bool = False) -> list:
    """Save {file name: Figure} under `out` (when save) and close each figure
    unless it is to be shown (a notebook displays it)."""

    paths = []
    for filename, fig in figures.items():
        if save:
            paths.append(save_figure(fig, out / filename))
        if not show:
            plt.close(fig)
    return paths
