"""Which items of a data set are held out for validation (`datasets[].validation`).

Membership is decided by each item's content id (the digest ingest gives an image from its
bytes), never by a random draw over the list: the id is hashed with a fixed salt into [0, 1).

- A fraction f (0 < f < 1) holds out an item iff its hash < f. Each item's side depends on its
  own bytes only: adding, removing or renaming images never moves another one. The strictly
  stable form, and about f of the data set.
- A count k (an integer >= 1) holds out the k items with the smallest hashes. A count cannot be
  exact and stable at once: adding an image moves at most one existing item (the k-th, to
  training, when the new one ranks among the k smallest), removing a held-out one moves at most
  one (the next, to validation); renaming moves nothing. A data set of k images or fewer is
  held out whole.
- `all` holds out the whole data set (kohya's `validation_split = 1.0`, OneTrainer's
  validation concepts): it is evaluated and never trained on.
- null or 0: no split (the default).

1.0 is refused: it reads as both "one image" and "all of them".
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable
from typing import Any, Union

TRAIN = "train"
VALIDATION = "validation"
ALL = "all"
# Changing it moves every item: a fixed part of the rule, like the hash.
SALT = b"tuneline validation split v1\0"
ALLOWED = ("null or 0 (no split), a fraction between 0 and 1 exclusive (e.g. 0.1: the strictly stable form), "
           "an integer count >= 1 (e.g. 5), or 'all' (the whole data set is validation-only)")

Validation = Union[None, int, float, str]


def parse_validation(value: Any) -> Validation:
    """The setting in its normal form (None, a fraction, a count or 'all'); ValueError with the allowed values."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise ValueError(f"expected a number or 'all', got {str(value).lower()}; allowed: {ALLOWED}")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"a count cannot be negative; allowed: {ALLOWED}")
        return value or None
    if isinstance(value, float):
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"not a usable fraction; allowed: {ALLOWED}")
        if value == 0:
            return None
        if value < 1:
            return value
        if value == 1:
            raise ValueError(f"1.0 reads as both one image and the whole data set: write 1 for one image or "
                             f"'all' for the whole data set; allowed: {ALLOWED}")
        if value.is_integer():
            raise ValueError(f"a count is an integer: write {int(value)}; allowed: {ALLOWED}")
        raise ValueError(f"a fraction lies between 0 and 1; allowed: {ALLOWED}")
    if isinstance(value, str):
        text = value.strip().lower()
        if text == ALL:
            return ALL
        try:  # YAML reads 1e-1 as a string
            number: int | float = int(text) if text.isdigit() else float(text)
        except ValueError:
            raise ValueError(f"allowed: {ALLOWED}") from None
        return parse_validation(number)
    raise ValueError(f"allowed: {ALLOWED}")


def split_hash(item_id: str) -> float:
    """The item's place in [0, 1): from its content id and the fixed salt only."""
    digest = hashlib.sha256(SALT + item_id.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0 ** 64


def held_out(ids: Iterable[str], validation: Validation) -> set[str]:
    """The ids (of one data set) that are validation-only under `validation` (in normal form)."""
    ids = list(ids)
    if validation is None:
        return set()
    if validation == ALL:
        return set(ids)
    if isinstance(validation, float):
        return {item for item in ids if split_hash(item) < validation}
    ranked = sorted(set(ids), key=lambda item: (split_hash(item), item))
    return set(ranked[:int(validation)])


def split_of(ids_by_dataset: dict[str, list[str]],
             validation_by_dataset: dict[str, Validation]) -> dict[str, dict[str, str]]:
    """data set -> id -> TRAIN or VALIDATION (a data set without a setting trains on everything)."""
    result = {}
    for dataset, ids in ids_by_dataset.items():
        held = held_out(ids, validation_by_dataset.get(dataset))
        result[dataset] = {item: VALIDATION if item in held else TRAIN for item in ids}
    return result


def describe(validation: Validation) -> str:
    """The rule in words, for `tuneline check` and the latents summary."""
    if validation is None:
        return "no split: every image trains"
    if validation == ALL:
        return "all: validation-only, never trained on"
    if isinstance(validation, float):
        return (f"fraction {validation:g}: an image is held out iff the salted hash of its content id is < "
                f"{validation:g} (stable: adding, removing or renaming images moves no other image)")
    return (f"count {validation}: the {validation} image(s) with the smallest salted hash of their content id "
            f"(adding or removing an image moves at most one other; a fraction is the strictly stable form)")
