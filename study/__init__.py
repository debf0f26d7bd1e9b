"""Studies: a declared grid of (algorithm x epsilon or sigma x seed x hyper-parameters), tuned
with the same budget per algorithm, run as in-process simulations, resumable, and reported as a
Markdown page with figures. ``python -m study studies/<name>.toml`` (or ``make study``).
"""

from .spec import Arm, SpecError, Study, Tuning, load_spec

__all__ = ["Arm", "SpecError", "Study", "Tuning", "load_spec"]
