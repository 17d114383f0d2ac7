"""Prefect 3 flows over the pipeline (full-run, stage, compare), their task wrappers, cache keys, progress sinks
and the deployments' server. The CLI and the local stack's processes live in cli/."""
