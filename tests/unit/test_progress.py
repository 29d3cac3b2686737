"""Progress on the console: a tqdm bar on a terminal, plain log lines elsewhere (no '\\r')."""

import io

from jaxdistill import progress


class _Tty(io.StringIO):
  def isatty(self):
    return True


def test_a_file_gets_log_lines_every_n_units_and_no_carriage_returns():
  out = io.StringIO()
  bar = progress.bar(100, unit="step", every=25, stream=out)
  for step in range(1, 101):
    bar.set_postfix(loss=f"{1 / step:.3f}")
    bar.update(1)
  bar.close()
  lines = out.getvalue().splitlines()
  assert "\r" not in out.getvalue()
  assert [line.split()[1] for line in lines] == ["25/100", "50/100", "75/100", "100/100"]
  assert "loss=0.040" in lines[0] and "(25%)" in lines[0] and "loss=0.010" in lines[-1]


def test_a_resumed_job_counts_from_where_it_was_and_a_short_job_still_says_where_it_ended():
  out = io.StringIO()
  bar = progress.bar(100, unit="step", initial=40, every=25, stream=out)
  bar.update(15)  # 55: crosses 50
  bar.update(5)  # 60: no line
  bar.close()  # stopped early (preempted): the last position is logged
  assert [line.split()[1] for line in out.getvalue().splitlines()] == ["55/100", "60/100"]


def test_hidden_writes_nothing_and_a_terminal_gets_tqdm():
  out = io.StringIO()
  bar = progress.bar(10, unit="step", show=False, every=1, stream=out)
  bar.update(10)
  bar.close()
  assert out.getvalue() == ""
  tty = _Tty()
  bar = progress.bar(10, unit="step", stream=tty)
  assert type(bar).__module__.startswith("tqdm")
  bar.update(10)
  bar.close()
  assert "\r" in tty.getvalue()  # the live bar redraws itself, as on a real terminal
