"""Stage `bucket`."""

# The modules that decide what an item's stored result is (tuneline.core.codeversion).
CODE = ("stages/bucket/stage.py", "stages/bucket/aspect.py", "core/images.py", "core/png.py")
