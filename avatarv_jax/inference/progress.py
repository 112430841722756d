"""A text progress bar over chunks and sampling steps, with the time left.

The time left is extrapolated from the steps done so far, leaving out the first chunk once a
later chunk has run (it carries the compilation). On a terminal the bar redraws in place;
elsewhere (logs, CI) it prints one line per chunk.
"""

from __future__ import annotations

import sys
import time


def _clock(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    m, s = divmod(seconds, 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


class Progress:
    """``start_chunk(i)`` then ``step(j)`` per sampling step; ``close()`` at the end."""

    def __init__(self, num_chunks: int, steps_per_chunk: int, *, stream=None,
                 enabled: bool = True, width: int = 24):
        self.num_chunks, self.steps = num_chunks, steps_per_chunk
        self.stream = stream if stream is not None else sys.stderr
        self.enabled, self.width = enabled, width
        self.interactive = enabled and hasattr(self.stream, "isatty") and self.stream.isatty()
        self.t0 = time.perf_counter()
        self.chunk, self.done = 0, 0
        self._first_chunk_end: float | None = None

    @property
    def total(self) -> int:
        return self.num_chunks * self.steps

    def seconds_left(self) -> float | None:
        now = time.perf_counter()
        if self._first_chunk_end is not None and self.done > self.steps:
            rate = (now - self._first_chunk_end) / (self.done - self.steps)
        elif self.done:
            rate = (now - self.t0) / self.done
        else:
            return None
        return rate * (self.total - self.done)

    def start_chunk(self, index: int) -> None:
        if index == 1 and self._first_chunk_end is None:
            self._first_chunk_end = time.perf_counter()
        self.chunk = index

    def step(self, step_index: int) -> None:
        self.done = self.chunk * self.steps + step_index + 1
        if self.interactive or (self.enabled and step_index + 1 == self.steps):
            self._draw(end="" if self.interactive else "\n")

    def line(self) -> str:
        frac = self.done / max(1, self.total)
        filled = int(round(frac * self.width))
        left = self.seconds_left()
        eta = "?" if left is None else _clock(left)
        step = self.done - self.chunk * self.steps
        return (f"[{'#' * filled}{'.' * (self.width - filled)}] {100 * frac:3.0f}% "
                f"chunk {self.chunk + 1}/{self.num_chunks} step {step}/{self.steps} "
                f"elapsed {_clock(time.perf_counter() - self.t0)} left {eta}")

    def _draw(self, end: str) -> None:
        prefix = "\r" if self.interactive else ""
        self.stream.write(prefix + self.line() + end)
        self.stream.flush()

    def close(self) -> None:
        if self.interactive:
            self.stream.write("\n")
            self.stream.flush()
