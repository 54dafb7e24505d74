"""A run's lifecycle, in layers that depend one way (each imports only those above it):

  (flux_lora/records.py, below the snapshot: the run folder's records: status.json and its attempts,
  pointers, which process is whose)
  slurm.py      which SLURM job (array task, restart) this is, and what SLURM says of a job
  lease.py      one owner per run id: an exclusively created file under paths.outputs/.leases; SLURM, this
                machine's processes or a heartbeat say whether its holder is gone
  states.py     saved training states: which one a run can continue from
  outcome.py    what a finished job's artefacts say (steps trained, LoRA written, loss finite)
  job.py        the `accelerate launch` job under its guard: start, stream, signals, judge the attempt
  job_guard.py  the guard process itself (standard library only)
  decision.py   a known run id: skip it, resume it where it lives, or start it
launch.py calls decision and job; nothing here imports launch.py, the check or Hydra (tests/test_imports.py).
"""
