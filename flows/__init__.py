"""Prefect 3 flows over the pipeline (full-run, stage, compare), their task wrappers and cache keys, the local
stack (Prefect server + Ray head) and the `microdit` CLI."""
