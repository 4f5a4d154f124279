"""Where model files come from (local paths, S3) and the per-host disk cache they land in."""
