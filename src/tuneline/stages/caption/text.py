"""Caption text: cleaning model output, putting the trigger word in front, reading caption files."""

from __future__ import annotations

import codecs
import re
from pathlib import Path

# Special tokens that can survive decoding: task prompts (<CAPTION>, </s>, <pad>, <od>),
# location bins (<loc_123>). Captions never legitimately contain "<word>".
_SPECIAL_TOKEN = re.compile(r"</?[A-Za-z][A-Za-z_]*(?:_\d+)?>")
# Only generic media: "The painting shows" says something about style and stays.
_MEDIUM = r"(?:image|picture|photo(?:graph)?)"
# Openers that describe the medium instead of the content: a trigger word and the
# content should lead a training caption, and these burn CLIP's 77 tokens on nothing.
_OPENER = re.compile(
    rf"""^(?:
        (?:the|this)\s+{_MEDIUM}\s+
            (?:shows|depicts|features|contains|captures|displays|presents|portrays|illustrates|is\s+of|is)\b
      | in\s+(?:the|this)\s+{_MEDIUM}\b\s*,?\s*(?:we\s+can\s+see|you\s+can\s+see|there\s+(?:is|are)|is|are)?\b
      | (?:this|it)\s+is\s+(?:an?\s+)?{_MEDIUM}\s+of\b
    )\s*[,:]?\s*""",
    re.IGNORECASE | re.VERBOSE,
)


def clean_caption(text: str) -> str:
    """Model output -> caption: no special tokens, no "The image shows" opener, single spaces.

    Returns "" when nothing caption-like is left (no letter or digit): the caller then
    uses the configured default caption and counts it.
    """
    text = _SPECIAL_TOKEN.sub(" ", text)
    text = " ".join(text.split())
    text = _OPENER.sub("", text, count=1).strip()
    # The opener may leave a leading comma or colon ("The image shows: a cat").
    text = text.lstrip(",;:- ").strip()
    return text if re.search(r"\w", text) else ""


def normalize_caption(text: str) -> str:
    """Whitespace collapsed to single spaces: the form captions are compared and stored in."""
    return " ".join(text.split())


def with_trigger(trigger: str | None, caption: str) -> str:
    """`trigger, caption`, unless the caption already starts with the trigger as a word (any case)."""
    trigger = normalize_caption(trigger or "").strip(", ")
    caption = normalize_caption(caption)
    if not trigger:
        return caption
    if not caption:
        return trigger
    if re.match(rf"{re.escape(trigger)}(?!\w)", caption, re.IGNORECASE):
        return caption
    return f"{trigger}, {caption}"


def read_caption_file(path: Path) -> str | None:
    """A caption file as normalised text (UTF-8 or UTF-16 with BOM; bad bytes replaced); None if absent."""
    try:
        raw = Path(path).read_bytes()
    except FileNotFoundError:
        return None
    if raw.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        return normalize_caption(raw.decode("utf-16", errors="replace"))
    return normalize_caption(raw.removeprefix(codecs.BOM_UTF8).decode("utf-8", errors="replace"))
