"""Stage `ingest`."""

# The modules that decide what an item's stored result is (tuneline.core.codeversion): the probe
# record. stage.py only assembles the output from the records, every run.
CODE = ("stages/ingest/probe.py", "core/images.py")
