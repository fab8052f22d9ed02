"""Named evaluation tasks (the built-in benchmark, `tsv:PATH` files) and calibration sources."""

from __future__ import annotations

from functools import partial

from mquant.errors import MquantError
from mquant.eval.tasks import METRICS, Task
from mquant.zoo import benchmark

_BUILTIN = {
    "digits": ("exact_match", 4, "read a real handwritten digit"),
    "textread": ("vqa_accuracy", 10, "read a word or number, sometimes over a photo"),
    "docfields": ("anls", 10, "read a named field of a rendered form"),
    "yesno": ("mme", 20, "yes/no questions in pairs about shapes (acc, acc+)"),
    "choice": ("option_accuracy", 12, "multiple choice with lettered options"),
    "compare": ("exact_match", 6, "two interleaved images: which has more circles"),
}

TASKS: dict[str, Task] = {
    name: Task(name, metric, partial(benchmark.generate, name, "test"), METRICS[metric], max_new,
               benchmark.TEST_SIZE[name], description)
    for name, (metric, max_new, description) in _BUILTIN.items()
}
BENCHMARK = tuple(TASKS)


def get_task(name: str) -> Task:
    if name.startswith("tsv:"):
        from mquant.eval.tsv import tsv_task

        return tsv_task(name[4:])
    if name not in TASKS:
        raise MquantError(f"unknown task '{name}'; available: {', '.join(TASKS)}, or tsv:PATH")
    return TASKS[name]


def calibration_source(spec: str, num_samples: int, seed: int):
    """`builtin` (alias `builtin:calib`): the benchmark's calib split, cycling over the tasks;
    `builtin:TASK,TASK,...`: the same over the named tasks only. None for any other spec."""
    if spec in ("builtin", "builtin:calib"):
        spec = "builtin:" + ",".join(benchmark.GENERATORS)
    if not spec.startswith("builtin:"):
        return None
    from mquant.pipeline.calib import CalibrationSet

    tasks = tuple(t.strip() for t in spec.removeprefix("builtin:").split(","))
    for task in tasks:
        if task not in benchmark.GENERATORS:
            raise MquantError(f"--calib {spec}: unknown built-in task {task!r}; "
                              f"available: {', '.join(benchmark.GENERATORS)}")
    name = "builtin:calib" if tasks == tuple(benchmark.GENERATORS) else spec
    return CalibrationSet(name, benchmark.mixed("calib", num_samples, tasks=tasks))
