"""Named evaluation tasks and built-in calibration sources."""

from __future__ import annotations

from mquant.errors import MquantError
from mquant.eval.tasks import COLORS_TASK, Task

TASKS: dict[str, Task] = {t.name: t for t in (COLORS_TASK,)}
DEFAULT_LIMIT = 64


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise MquantError(f"unknown task '{name}'; available: {', '.join(TASKS)}")
    return TASKS[name]


def calibration_source(spec: str, num_samples: int, seed: int):
    """A built-in calibration split for `spec`, or None when `spec` names none."""
    return None
