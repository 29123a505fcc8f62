"""Progress for long work: a tqdm bar on a terminal, plain periodic lines otherwise (logs, CI).

Both show items/s and the ETA. ``Progress`` is also a plain counter for code that only needs
the rate (``progress.rate``), so training and preparation report the same figures.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO


def _fmt_seconds(s: float) -> str:
    if s != s or s == float("inf"):
        return "?"
    s = int(s)
    h, rem = divmod(s, 3600)
    m, sec = divmod(rem, 60)
    return f"{h:d}:{m:02d}:{sec:02d}" if h else f"{m:d}:{sec:02d}"


class Progress:
    """``with Progress(total, "prepare train", unit="img") as p: p.update(n, loss=0.3)``.

    ``enabled=False`` silences output (non-zero ranks); ``interval`` is the seconds between
    plain lines when the stream is not a terminal.
    """

    def __init__(
        self,
        total: int | None,
        desc: str,
        unit: str = "img",
        *,
        enabled: bool = True,
        interval: float = 10.0,
        stream: TextIO | None = None,
        initial: int = 0,
    ) -> None:
        self.total, self.desc, self.unit = total, desc, unit
        self.enabled, self.interval = enabled, interval
        self.stream = stream if stream is not None else sys.stderr
        self.n = self._start_n = initial
        self.postfix: dict[str, object] = {}
        self._t0 = self._last_line = time.perf_counter()
        self._bar = None
        if enabled and getattr(self.stream, "isatty", lambda: False)():
            from tqdm import tqdm

            self._bar = tqdm(
                total=total,
                desc=desc,
                unit=unit,
                initial=initial,
                file=self.stream,
                dynamic_ncols=True,
                unit_scale=False,
                smoothing=0.1,
            )

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self._t0

    @property
    def rate(self) -> float:
        """Items per second since the start (items before ``initial`` not counted)."""
        return (self.n - self._start_n) / max(self.elapsed, 1e-9)

    def eta(self) -> float:
        if self.total is None or self.rate <= 0:
            return float("nan")
        return (self.total - self.n) / self.rate

    def update(self, n: int = 1, **postfix: object) -> None:
        self.n += n
        self.postfix.update(postfix)
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.update(n)
            if postfix:
                self._bar.set_postfix({k: _fmt(v) for k, v in self.postfix.items()}, refresh=False)
            return
        now = time.perf_counter()
        if now - self._last_line >= self.interval:
            self._last_line = now
            self._line()

    def _line(self) -> None:
        total = f"/{self.total}" if self.total is not None else ""
        extra = " ".join(f"{k}={_fmt(v)}" for k, v in self.postfix.items())
        times = f"elapsed {_fmt_seconds(self.elapsed)} | eta {_fmt_seconds(self.eta())}"
        print(
            f"{self.desc}: {self.n}{total} {self.unit} | {self.rate:.1f} {self.unit}/s | "
            f"{times} {extra}".rstrip(),
            file=self.stream,
            flush=True,
        )

    def close(self) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        else:
            self._line()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _fmt(v: object) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)
