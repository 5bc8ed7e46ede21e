"""How the report sections write numbers (one rule, so every section agrees)."""
from __future__ import annotations


def pct(x: float | None, digits: int = 2) -> str:
    """A fraction in [0, 1] as a percentage ("50.13%"); None (undefined) as "n/a"."""
    return "n/a" if x is None else f"{100 * x:.{digits}f}%"


def per_model(values: dict[str, str]) -> str:
    """{model: formatted value} as running text: "50.13% (baseline) and 40.77% (improved)"."""
    parts = [f"{v} ({name})" for name, v in values.items()]
    return " and ".join(parts) if len(parts) <= 2 else ", ".join(parts[:-1]) + " and " + parts[-1]
