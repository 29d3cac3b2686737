"""Training: the state, THE step and its one jit, runs, checkpoints, the loop.

  step        TrainState and ``distill_step(state, teacher_vars, batch)``
  optim       the optimizer and its learning-rate schedule (re-exported by ``step``)
  ema         an EMA teacher (self-distillation): its average in the state, its update
  teacher     where the teacher's params come from (``teacher.source``), loaded and placed
  checkpoint  Orbax checkpoints for exact resume (the teacher is never saved)
  run         ``build_run``: a config -> mesh, models, objective, state, teacher, jitted step
  workdir     a run's workdir prepared for a run or read back as a model
  loop        ``run_steps`` and ``train``: a whole run in a workdir
  metrics     metric writers (JSONL, TensorBoard), throughput accounting in ``throughput``

Layers 1 (metrics, throughput), 4 (step, optim, ema, teacher, checkpoint) and 5 (run, workdir,
loop): may import ``distill``, ``config``, ``data``, ``models``, ``parallel``,
``evaluation.evaluate`` (the evaluation functions the loop calls) and below; never the jobs
or the CLI.
"""
