"""The worker's parts (train_gpt.py is the worker; run.py the launcher that starts it):

    checkpoint  checkpoints, their manifests and verification, resume
    metrics     metrics.jsonl, the summary's values, the step clock, env.json
    memory      peak and current memory, bytes of parameters, gradients and optimizer state
    parallel    the process group, collectives, DDP or FSDP2, the gradient exchange
    outcome     how a run ends: exit codes, RunFailed, summary.json's status
    spectrum    the spectral diagnostics (logging.spectrum_every, spectrum.jsonl)
    fileio      the one atomic file write, appended JSON lines
    runlock     one owner per run folder; workers that die with their launcher (the launcher and
                sweeps take the lock too)

docs/architecture.md shows what flows between them.
"""
