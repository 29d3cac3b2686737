"""Progress on the console: a live bar on a terminal, a plain log line otherwise.

A tqdm bar redraws itself with carriage returns several times a second; written to a file or
a pipe (a job's log, CI, ``2> run.log``) that is thousands of frames a run. ``bar`` gives the
tqdm bar only when the stream is a terminal, and otherwise an object with the same three
methods that prints one line every ``every`` units (and at the end), e.g.::

  step 200/1000 (20%) loss=4.1231 tok_s=12,345 [41 s]

Layer 0: imports nothing of the package.
"""

import sys
import time
from typing import IO, Any


class LogLines:
  """tqdm's ``update`` / ``set_postfix`` / ``close``, printed as a line every ``every`` units."""

  def __init__(self, total: int, initial: int, unit: str, every: int, stream: IO, disable: bool):
    self.total, self.n, self.unit, self.every = total, initial, unit, max(1, every)
    self.stream, self.disable, self.postfix = stream, disable, {}
    self.start, self.logged = time.monotonic(), initial

  def update(self, n: int = 1) -> None:
    # A line when a multiple of ``every`` was crossed; the end's line is close()'s.
    crossed = self.n // self.every < (self.n + n) // self.every
    self.n += n
    if crossed and self.n < self.total:
      self._line()

  def set_postfix(self, **kwargs: Any) -> None:
    self.postfix = {k: str(v) for k, v in kwargs.items()}

  def close(self) -> None:
    if self.n != self.logged:  # where the job ended (done, or stopped early) is always logged
      self._line()
    self.disable = True

  def _line(self) -> None:
    self.logged = self.n
    if self.disable:
      return
    share = f" ({self.n / self.total:.0%})" if self.total else ""
    extra = "".join(f" {k}={v}" for k, v in self.postfix.items())
    secs = time.monotonic() - self.start
    print(
      f"{self.unit} {self.n}/{self.total}{share}{extra} [{secs:.0f} s]",
      file=self.stream,
      flush=True,
    )


def bar(
  total: int,
  *,
  unit: str,
  show: bool = True,
  initial: int = 0,
  every: int | None = None,
  stream: IO | None = None,
):
  """A progress bar: tqdm on a terminal, ``LogLines`` (a line every ``every`` units) elsewhere.

  Args:
    total: units in the whole job (steps, tokens, images...).
    unit: the unit's name, shown in the bar or line.
    show: False hides it (another process than 0, ``log.progress=False``).
    initial: units already done (a resumed run).
    every: units between log lines when not on a terminal (default: about 20 lines a job).
    stream: where it writes (default stderr).

  Returns:
    An object with ``update(n)``, ``set_postfix(**kw)`` and ``close()``.
  """
  stream = sys.stderr if stream is None else stream
  if show and getattr(stream, "isatty", lambda: False)():
    import tqdm

    return tqdm.tqdm(
      total=total,
      initial=initial,
      unit=unit,
      dynamic_ncols=True,
      file=stream,
      unit_scale=total > 100_000,
    )
  every = every or max(1, total // 20)
  return LogLines(total, initial, unit, every, stream, disable=not show)
