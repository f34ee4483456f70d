"""Progress of a training run on stderr (rank 0): a live bar on a terminal, plain lines elsewhere.

* On a terminal: a tqdm bar ``train  20%|██      | 12/60 [00:05<00:20, loss=2.3456, tok/s=1,234,
  lr=3.00e-04]`` (step/total, elapsed, ETA and the latest loss, tokens/s and learning rate),
  refreshed at most every ``mininterval`` seconds; log lines are printed above it.
* Without a terminal (a job log, a pipe, CI): one plain line after the first step (which
  also pays one-time costs: its time says how long a step takes) and then one every
  ``interval`` seconds (10 by default),
  ``step 12/60 (20%): loss 2.3456, lr 3.00e-04, 1,234 tokens/s, elapsed 5s, eta 20s``.
  Eval results are printed by the trainer's log at every eval either way.
* ``hymba train --no-progress``: neither.
"""

from __future__ import annotations

import sys
import time
from typing import IO


def _duration(seconds: float) -> str:
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    m, s = divmod(s, 60)
    if m < 60:
        return f"{m}m{s:02d}s"
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m"


def _isatty(stream: IO[str]) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


class Progress:
    """``update()`` after every optimizer step, ``write()`` for log lines, ``close()`` at the end."""

    def __init__(self, total: int, initial: int = 0, enabled: bool = True, stream: IO[str] | None = None,
                 interval: float = 10.0, desc: str = "train"):
        self.stream = stream if stream is not None else sys.stderr
        self.total, self.initial, self.interval = total, initial, interval
        self.enabled = enabled
        self.bar = None
        self.lines = enabled and not _isatty(self.stream)
        if enabled and not self.lines:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True, file=self.stream,
                            desc=desc, mininterval=0.25, smoothing=0.1)
        self.t_start = time.perf_counter()
        self.t_first: float | None = None  # when the run's first step ended (ETA leaves that step out)
        self.n_first = initial
        self.last_line: float | None = None

    def update(self, step: int, loss: float, tokens_per_s: float, lr: float) -> None:
        """Step ``step`` (1-based) is done."""
        now = time.perf_counter()
        if self.t_first is None:
            self.t_first, self.n_first = now, step
        if self.bar is not None:
            self.bar.set_postfix({"loss": f"{loss:.4f}", "tok/s": f"{tokens_per_s:,.0f}", "lr": f"{lr:.2e}"},
                                 refresh=False)
            self.bar.update(step - self.bar.n)
        elif self.lines and (self.last_line is None or now - self.last_line >= self.interval or step == self.total):
            self.last_line = now
            self.stream.write(self.line(step, loss, tokens_per_s, lr, now) + "\n")
            self.stream.flush()

    def eta(self, step: int, now: float) -> float | None:
        if self.t_first is None or step <= self.n_first:
            return None
        return (now - self.t_first) / (step - self.n_first) * (self.total - step)

    def line(self, step: int, loss: float, tokens_per_s: float, lr: float, now: float) -> str:
        eta = self.eta(step, now)
        return (f"step {step}/{self.total} ({100 * step / max(self.total, 1):.0f}%): loss {loss:.4f}, lr {lr:.2e}, "
                f"{tokens_per_s:,.0f} tokens/s, elapsed {_duration(now - self.t_start)}"
                + (f", eta {_duration(eta)}" if eta is not None else ""))

    def write(self, msg: str) -> None:
        if self.bar is not None:
            self.bar.write(msg, file=self.stream)
        else:
            self.stream.write(msg + "\n")
            self.stream.flush()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
