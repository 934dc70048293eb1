"""The live progress line of a bulk run: bar, counts, rate, ETA, failures.

On a terminal the line is redrawn in place; otherwise (CI logs, pipes) a full line
is printed every ``log_every_s`` seconds, so logs stay readable.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO

from egm.bulk.run_store import RunProgress, RunState


def format_duration(seconds: float | None) -> str:
    if seconds is None:
        return "--:--"
    seconds = int(round(max(0.0, seconds)))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


def render(p: RunProgress, width: int = 24) -> str:
    total = max(p.total, 1)
    frac = min(1.0, p.resolved / total)
    filled = int(frac * width)
    bar = "#" * filled + "." * (width - filled)
    parts = [f"[{bar}] {p.resolved}/{p.total} {frac * 100:5.1f}%",
             f"{p.rate:.1f} tasks/s", f"ETA {format_duration(p.eta_s)}", f"failed {p.failed}"]
    if p.retrying:
        parts.append(f"retrying {p.retrying}")
    if p.cached:
        parts.append(f"cached {p.cached}")
    if p.skipped:
        parts.append(f"skipped {p.skipped}")
    if p.state not in (RunState.running, RunState.done):
        parts.append(p.state.upper())
    return "  ".join(parts)


class ProgressPrinter:
    def __init__(self, stream: TextIO | None = None, *, tty: bool | None = None, log_every_s: float = 10.0,
                 enabled: bool = True) -> None:
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty() if tty is None else tty
        self.log_every_s = log_every_s
        self.enabled = enabled
        self._last_line = ""
        self._last_print = 0.0
        self._open = False

    def update(self, progress: RunProgress, force: bool = False) -> None:
        if not self.enabled:
            return
        line = render(progress)
        if self.tty:
            if line != self._last_line:
                pad = max(0, len(self._last_line) - len(line))
                self.stream.write("\r" + line + " " * pad)
                self.stream.flush()
                self._open = True
        elif force or time.monotonic() - self._last_print >= self.log_every_s:
            self.stream.write(line + "\n")
            self.stream.flush()
            self._last_print = time.monotonic()
        self._last_line = line

    def message(self, text: str) -> None:
        """A line of its own that does not garble the bar."""
        if not self.enabled:
            return
        if self._open:
            self.stream.write("\n")
            self._open = False
        self.stream.write(text + "\n")
        self.stream.flush()
        self._last_line = ""

    def close(self, progress: RunProgress | None = None) -> None:
        if progress is not None:
            self.update(progress, force=True)
        if self._open:
            self.stream.write("\n")
            self.stream.flush()
            self._open = False
