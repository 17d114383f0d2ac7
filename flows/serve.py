"""Serve the `microdit` deployments (`microdit/full-run`, `microdit/stage`, `microdit/compare`) from this process.

Run with the stack's PREFECT_API_URL/PREFECT_HOME (and RAY_ADDRESS) in the environment; flow runs triggered by
`prefect deployment run microdit/full-run` or `microdit run` execute as child processes of this one.
"""
from __future__ import annotations

from prefect import serve

from flows.compare import COMPARE, compare_run
from flows.full_run import FULL_RUN, full_run
from flows.stage import STAGE, stage_run


def deployments():
    """The deployments this project serves."""
    return [full_run.to_deployment(name=FULL_RUN, description="Download -> precompute -> 4 stages -> sample."),
            stage_run.to_deployment(name=STAGE, description="Rerun one training stage from cached latents."),
            compare_run.to_deployment(name=COMPARE, description="One stage with and without masking at equal "
                                                                "compute, side by side.")]


def main() -> None:
    serve(*deployments())


if __name__ == "__main__":
    main()
