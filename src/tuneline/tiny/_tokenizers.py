"""Offline byte-level BPE vocabularies for the tiny CLIP and BART tokenizers.

Real checkpoints ship vocab.json + merges.txt learned on web text; here the
vocab is just the 256 byte symbols (plus a few merges so BPE actually merges),
which is enough for any string to tokenize without an unknown token.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

# A handful of merges so the BPE model is exercised (and common words stay short).
_CLIP_MERGES = ("t h", "th e</w>", "o f</w>", "i n", "c a", "ca t</w>", "p h", "o t", "ot o</w>")
_BART_MERGES = ("Ġ a", "Ġ t", "h e", "Ġt he", "i n", "Ġ o", "Ġo f", "Ġ c", "Ġc a", "Ġca t")

CLIP_BOS = "<|startoftext|>"
CLIP_EOS = "<|endoftext|>"


@lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable unicode character table (256 entries)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    codes = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(code) for code in codes), strict=True))


def _merge_result(merge: str) -> str:
    left, right = merge.split(" ")
    return left + right


def clip_vocab() -> tuple[dict[str, int], list[str]]:
    """CLIP-style vocab (bytes, bytes + `</w>`, merges, BOS/EOS last as in CLIP) and merges."""
    symbols = list(bytes_to_unicode().values())
    tokens = symbols + [symbol + "</w>" for symbol in symbols]
    tokens += [_merge_result(merge) for merge in _CLIP_MERGES]
    tokens += [CLIP_BOS, CLIP_EOS]
    return {token: index for index, token in enumerate(tokens)}, list(_CLIP_MERGES)


def bart_vocab() -> tuple[dict[str, int], list[str]]:
    """BART/RoBERTa-style vocab: <s>, <pad>, </s>, <unk> first (ids 0-3), then bytes and merges."""
    tokens = ["<s>", "<pad>", "</s>", "<unk>"] + list(bytes_to_unicode().values())
    tokens += [_merge_result(merge) for merge in _BART_MERGES]
    return {token: index for index, token in enumerate(tokens)}, list(_BART_MERGES)


def write_bpe_files(folder: Path, vocab: dict[str, int], merges: list[str]) -> None:
    """Write vocab.json + merges.txt the way GPT-2/CLIP/BART checkpoints store them."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), "utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", "utf-8")


# Byte-level pairs in Qwen's style (Ġ = a leading space), so the BPE actually merges.
_QWEN_MERGES = ("Ġ a", "Ġ t", "h e", "Ġt he", "i n", "Ġ o", "Ġo f", "Ġ c", "Ġc a", "Ġca t")
QWEN_ENDOFTEXT = "<|endoftext|>"
QWEN_IM_START = "<|im_start|>"
QWEN_IM_END = "<|im_end|>"
# Qwen3 ships <think>/</think> as added (not special) tokens; its chat template writes them.
QWEN_THINK = ("<think>", "</think>")


def qwen_vocab() -> tuple[dict[str, int], list[str]]:
    """Qwen2/3-style vocab: the byte symbols first (ids 0-255, GPT-2 order as in Qwen), merges,
    then the control tokens after the BPE vocab, as in Qwen3 (<|endoftext|>, <|im_start|>,
    <|im_end|>, then <think>, </think>)."""
    tokens = list(bytes_to_unicode().values()) + [_merge_result(merge) for merge in _QWEN_MERGES]
    tokens += [QWEN_ENDOFTEXT, QWEN_IM_START, QWEN_IM_END, *QWEN_THINK]
    return {token: index for index, token in enumerate(tokens)}, list(_QWEN_MERGES)
