"""Stage `bucket`."""
