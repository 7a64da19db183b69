"""Stage `ingest`."""

# The modules that decide what an item's stored result is (tuneline.core.codeversion).
CODE = ("stages/ingest/stage.py", "core/images.py")
