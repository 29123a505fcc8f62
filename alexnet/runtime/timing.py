"""Side-by-side timing: every benchmark and ``--backend auto`` time their contenders here.

Rounds alternate between the contenders, so a change in the machine's load falls on all of
them alike, and the order rotates by one each round, so no contender always goes first.
Rotation keeps the cyclic order, so each still mostly runs right after the same other one;
what that one leaves behind is handled by a pause instead: before each contender's stretch
the timer waits ``settle`` seconds, untimed: ONNX Runtime's threads spin for tens of
milliseconds after a run (its default, kept: it is how users run it), and on a small
machine whatever runs next gets less CPU (OpenVINO measured 975 images/s right after it
against 1,326 after itself, and 1,247 after a 50 ms pause). Each figure is the median over
rounds.
"""

from __future__ import annotations

import functools
import math
import statistics
import time
from collections.abc import Callable


def alternating(
    fns: dict[str, Callable[[], object]],
    rounds: int,
    steps: int = 1,
    sync: Callable[[], object] | None = None,
    settle: float = 0.1,
) -> dict[str, float]:
    """Median seconds per call of each fn over ``rounds`` rounds of ``steps`` calls.
    ``sync`` runs before and after each timed stretch (a device synchronise). Keep other work
    out of the process meanwhile: a memory probe's sampling thread took 4% (paper net) and
    8% (small) of our training step, whose many small ops give the sampler the GIL often,
    and less of the reference's (bench.speed measures memory in steps of its own)."""
    names = list(fns)
    seconds: dict[str, list[float]] = {k: [] for k in names}
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            if settle > 0:
                time.sleep(settle)
            if sync:
                sync()
            t0 = time.perf_counter()
            for _ in range(steps):
                fns[name]()
            if sync:
                sync()
            seconds[name].append((time.perf_counter() - t0) / steps)
    return {k: statistics.median(v) for k, v in seconds.items()}


def stretch_steps(fns: dict[str, Callable[[], object]], stretch: float, steps: int = 1) -> int:
    """Calls per timed stretch for ``alternating``: at least ``steps``, and enough that the
    fastest fn's stretch lasts ``stretch`` seconds. Each fn is called twice here, the first
    as a warm-up (at batch 1 a call takes about a millisecond, and one or twenty of them are
    noise: two timings of the same runner came out 10% apart)."""
    fastest = math.inf
    for fn in fns.values():
        fn()
        t0 = time.perf_counter()
        fn()
        fastest = min(fastest, time.perf_counter() - t0)
    return max(steps, math.ceil(stretch / max(fastest, 1e-9)))


def alternating_on(
    fns: dict[str, Callable[[object], object]],
    arg: object,
    rounds: int,
    stretch: float,
    steps: int = 1,
) -> tuple[dict[str, float], int]:
    """``alternating`` of each fn called on ``arg``, in stretches of ``stretch_steps`` calls;
    also the calls per stretch."""
    calls = {k: functools.partial(fn, arg) for k, fn in fns.items()}
    steps = stretch_steps(calls, stretch, steps)
    return alternating(calls, rounds, steps), steps
