"""The shared core under every step: storage (local or s3://), the latent Parquet schema, image decoding, Ray connection, configs."""
