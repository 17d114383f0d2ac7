"""Pipeline steps as plain, idempotent functions over local or S3 URIs."""
