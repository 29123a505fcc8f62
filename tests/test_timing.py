"""Side-by-side timing (alexnet.runtime.timing): every contender runs in every round, the order
rotates, and the figure is the median of the rounds."""

import functools

from alexnet.runtime import timing


def test_rounds_alternate_and_the_order_rotates(monkeypatch):
    order, clock = [], iter(range(0, 10_000, 1))
    monkeypatch.setattr(timing.time, "perf_counter", lambda: next(clock))
    fns = {k: (lambda k=k: order.append(k)) for k in "abc"}
    timing.alternating(fns, rounds=3, steps=2, settle=0)
    calls = [order[i] for i in range(0, len(order), 2)]  # one name per stretch of 2 steps
    assert calls == list("abcbcacab")
    assert order[1::2] == calls  # each stretch is two calls of the same fn


def test_the_figure_is_the_median_seconds_per_call(monkeypatch):
    now = [0.0]
    monkeypatch.setattr(timing.time, "perf_counter", lambda: now[0])
    # Seconds each call takes, in call order: a's rounds cost 2, 50 and 3 a call.
    cost = {"a": iter([2, 2, 50, 50, 3, 3]), "b": iter([1] * 6)}

    def fn(name):
        now[0] += next(cost[name])

    syncs = []
    fns = {k: functools.partial(fn, k) for k in cost}
    out = timing.alternating(fns, rounds=3, steps=2, sync=lambda: syncs.append(1), settle=0)
    assert out == {"a": 3.0, "b": 1.0}
    assert len(syncs) == 2 * 3 * 2  # before and after each stretch


def test_each_stretch_waits_untimed_for_the_last_ones_threads_to_settle(monkeypatch):
    events = []
    monkeypatch.setattr(timing.time, "sleep", lambda s: events.append(("sleep", s)))
    monkeypatch.setattr(timing.time, "perf_counter", lambda: events.append(("clock",)) or 0.0)
    timing.alternating({"a": lambda: None, "b": lambda: None}, rounds=2, settle=0.05)
    # per stretch: the pause, then the clock read before and after (never a pause between)
    assert events == [("sleep", 0.05), ("clock",), ("clock",)] * 4


def test_stretches_are_long_enough_for_the_fastest_and_never_below_steps(monkeypatch):
    now = [0.0]
    monkeypatch.setattr(timing.time, "perf_counter", lambda: now[0])
    calls = {"a": 0, "b": 0}

    def fn(name, seconds):
        calls[name] += 1
        now[0] += seconds

    fast = {"a": functools.partial(fn, "a", 0.004), "b": functools.partial(fn, "b", 0.030)}
    assert timing.stretch_steps(fast, stretch=0.1) == 25  # 0.1 s of the 4 ms one
    assert calls == {"a": 2, "b": 2}  # a warm call and a timed one each
    slow = {"a": functools.partial(fn, "a", 0.5)}
    assert timing.stretch_steps(slow, stretch=0.1, steps=3) == 3
