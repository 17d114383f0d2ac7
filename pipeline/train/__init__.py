"""Training: one Ray Train job per stage (FSDP2) over a plain network, resumable, ending in an atomic export.

stage.py (the driver: train_stage), loop.py (what every worker runs), data.py (latents to batches), parallelize.py
(FSDP2, AC, compile applied from outside), checkpoint.py (DCP state and exports), optim.py, metrics.py,
samples.py, hooks.py (a narrow hook for fault injection in tests).
"""
