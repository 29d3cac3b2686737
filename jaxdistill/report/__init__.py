"""Reports over finished runs: ``jaxdistill report`` and the quickstart's summary.

  write      reads each run's workdir and writes report.md, report.json and the pictures
  table      one row per teacher and student, the Pareto front, the Markdown table
  plots      training and validation curves, quality against latency (matplotlib, Agg)
  noise      how far apart two measurements must be to differ: standard errors over batches,
             95% bounds, latency spreads; the won / tie / lost rule
  quickstart the quickstart's own summary and verdict on top of ``write``, and its LMs'
             generation section (speed table, sample continuations)

Layer 6 (jobs): may import ``train``, ``evaluation`` and below; only the CLI and other jobs
import it.
"""
