"""Stage `caption`."""

# The modules that decide what an item's stored result is (tuneline.core.codeversion). The
# model's weights count through its identity (tuneline.models.ref), not through code.
CODE = ("stages/caption/stage.py", "stages/caption/florence.py", "stages/caption/text.py", "models/ref.py")
