"""Pod preflight: compile the real step for hardware this host does not have, and judge it.

``jaxdistill compile --config C --topology v5p-128`` (``cli/compile.py``) answers, before a pod
is paid for, whether a run fits each chip's memory and how fast it can go:

  chips      chip peak figures, and the topology names users type (``parse_topology``)
  compiler   the abstract run (nothing allocated) lowered and compiled for the target;
             ``memory_analysis``, ``cost_analysis`` and the optimised HLO read into a report
  hlo        collective traffic from the optimised HLO, loops counted per trip
  roofline   the report and its roofline step time, tokens/s and MFU
  plan       ``--plan``: search meshes, teacher placement, remat and micro-batching
  probe      this host's measured peaks (the CPU roofline that checks the model against
             measured step times)
  tpu_env    what libtpu needs on a host without TPUs
"""
