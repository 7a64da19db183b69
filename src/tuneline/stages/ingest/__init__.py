"""Stage `ingest`."""
