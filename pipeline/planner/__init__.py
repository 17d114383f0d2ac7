"""Plan before you spend: what a recipe will take on a named cluster, before any GPU is rented.

    clusters.py     GPU kinds by name (peak dense bf16 FLOP/s, memory, sources) and cluster specs ("8xH100")
    memory.py       the sharded training state per GPU, exact from a meta-device build, and what FSDP2 gathers
    activations.py  saved-for-backward bytes of a stage's loss, measured on the meta device, modelled per token
    measured.py     what the GPU suite measured on a GPU kind: the training step's MFU, the encoders' items/s
    data.py         bytes per row, storage, the input rate per GPU and the CPU cores it takes
    plan.py         the plan's record: per stage and in all
    estimate.py     per stage and in all: samples, FLOPs, hours, cost, memory, the largest micro-batch that fits
    render.py       the plan as text and Markdown; beside what a run measured
"""
