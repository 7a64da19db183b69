"""Stage `caption`."""
