"""The pipeline's steps as plain, idempotent functions over local or s3:// URIs, grouped by step.

    core/       the shared core: the typed run plan (plan/), the storage layout and completion markers
                (layout.py), storage over local/S3, the latent Parquet schema, image decoding, Ray connection
    data/       dataset adapters (sources/), download with img2dataset, precompute on Ray Data
    train/      one Ray Train + FSDP2 job per stage
    generate.py text to images from an export; evaluate/ FID, CLIP score, caption match; report/ run reports
    checks.py   the plan's edge check against model families and dataset adapters
    testing/    test and demo machinery (synthetic shapes and their server, fault injection), never configured
                through the plan
"""
