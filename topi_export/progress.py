"""What a person sees while work runs: a tqdm bar on a terminal; timestamped lines on stderr when it is not a
terminal (a CI log, ``2> build.log``), so progress still reaches the log; nothing with ``--quiet`` or
``TQDM_DISABLE=1`` (tqdm's own switch, which the tests set). Long single calls (the ONNX export) get a ticker
line every few seconds, so a build that takes minutes never looks hung."""
from __future__ import annotations

import os
import sys
import threading
import time
from contextlib import contextmanager

LOG_EVERY_S = 5.0  # at most one progress line per this many seconds in log mode (plus the last)
TICK_S = 15.0  # ticker period of long single calls


def disabled_by_env() -> bool:
    return os.environ.get("TQDM_DISABLE", "").strip().lower() in ("1", "true", "yes")


def mode(enabled: bool = True, stream=None) -> str:
    """'bar' on a terminal, 'log' otherwise, 'off' when disabled."""
    if not enabled or disabled_by_env():
        return "off"
    stream = stream or sys.stderr
    try:
        return "bar" if stream.isatty() else "log"
    except (AttributeError, ValueError):
        return "log"


def log_line(text: str, stream=None) -> None:
    stream = stream or sys.stderr
    print(f"{time.strftime('%H:%M:%S')} {text}", file=stream, flush=True)


class Progress:
    """A counter shown as a bar (terminal), as log lines (anything else) or not at all. tqdm's interface:
    ``update(n)``, ``close()``, a context manager."""

    def __init__(self, total: int, desc: str, *, enabled: bool = True, unit: str = "step", stream=None):
        self.total, self.desc, self.unit, self.n = total, desc, unit, 0
        self.stream = stream or sys.stderr
        self.mode = mode(enabled, self.stream)
        self.t0 = self.last = time.perf_counter()
        self.bar = None
        if self.mode == "bar":
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=desc, leave=False, unit=unit, file=self.stream)

    def update(self, n: int = 1) -> None:
        self.n += n
        if self.bar is not None:
            self.bar.update(n)
        elif self.mode == "log":
            now = time.perf_counter()
            if now - self.last >= LOG_EVERY_S or self.n >= self.total or self.n == n:
                self.last = now
                rate = (now - self.t0) / max(self.n, 1)
                log_line(f"{self.desc}: {self.unit} {self.n}/{self.total} ({rate:.2f} s/{self.unit})", self.stream)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False


def progress_bar(total: int, desc: str, enabled: bool = True, unit: str = "step") -> Progress:
    return Progress(total, desc, enabled=enabled, unit=unit)


@contextmanager
def ticker(label: str, echo, period: float = TICK_S):
    """While the block runs, echo '<label>: N s' every `period` seconds (one long call shows it is alive). Yields
    a state whose ``label`` the block may change (e.g. per graph)."""
    from types import SimpleNamespace

    state = SimpleNamespace(label=label)
    if disabled_by_env():
        yield state
        return
    stop = threading.Event()
    t0 = time.perf_counter()

    def tick():
        while not stop.wait(period):
            echo(f"{state.label}: {time.perf_counter() - t0:.0f} s")

    thread = threading.Thread(target=tick, daemon=True)
    thread.start()
    try:
        yield state
    finally:
        stop.set()
        thread.join(timeout=1.0)
