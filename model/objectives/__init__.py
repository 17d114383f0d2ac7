"""Training objectives, one algorithm per file: EDM (edm.py) and rectified flow with REPA (rectified_flow.py).

configs.py holds each objective's constants and defaults (torch-free: the run plan makes its `objective` section
from them); objective.py turns a config into the object training and sampling use (`build(config)`). This file
imports nothing, so the plan's reading of the configs does not bring the algorithms into every step's cache key.
"""
