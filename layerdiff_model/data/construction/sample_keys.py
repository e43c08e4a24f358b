"""Sample keys: the names of samples in the shards (WebDataset splits a member name at its first '.')."""
from __future__ import annotations

import re

_NOT_KEY = re.compile(r"[^A-Za-z0-9_-]+")


def key_from_name(text: str) -> str:
    """``text`` with every run of characters other than letters, digits, '-' and '_' made '_' (so no '.' or
    '/'), without leading or trailing '_'; "sample" when nothing is left."""
    return _NOT_KEY.sub("_", text).strip("_") or "sample"


def unique_key(key: str, taken: set[str]) -> str:
    """``key``, or ``key_2``, ``key_3`` ... the first not in ``taken``; the result joins ``taken``."""
    candidate, n = key, 1
    while candidate in taken:
        n += 1
        candidate = f"{key}_{n}"
    taken.add(candidate)
    return candidate
