"""How the report sections write numbers (one rule, so every section agrees)."""
from __future__ import annotations


def pct(x: float | None, digits: int = 2) -> str:
    """A fraction in [0, 1] as a percentage ("50.13%"); None (undefined) as "n/a"."""
    return "n/a" if x is None else f"{100 * x:.{digits}f}%"
