"""Short stable keys: what a stage's inputs, a policy, a cache entry or a file hashes to.

One helper per kind of input, all SHA-1 hex prefixes: :func:`json_key` for JSON-able values
(keys sorted, so dict order never matters), :func:`bytes_key` for raw bytes (token ids, file
contents). Keys name things; they are not a security boundary. Two things keep their own
hashing on purpose: the synthetic benchmarks' split buckets (``tasks/synthetic.py``: part of
the data's definition) and samplers' per-trial seeds (``searching/_sampler.py``: part of the
random stream).

Example:
    >>> json_key({"b": 1, "a": [1, 2]}) == json_key({"a": [1, 2], "b": 1})
    True
    >>> len(json_key("x", n=12)), bytes_key([b"ab", b"c"]) == bytes_key([b"abc"])
    (12, True)
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Callable, Iterable

__all__ = ["json_key", "bytes_key", "file_key"]


def json_key(obj: Any, n: int = 16, default: Callable[[Any], Any] = str) -> str:
    """The first ``n`` hex digits of SHA-1 over ``obj`` as sorted-key JSON (``default`` renders
    what JSON cannot)."""
    blob = json.dumps(obj, sort_keys=True, default=default)
    return hashlib.sha1(blob.encode("utf-8")).hexdigest()[:n]


def bytes_key(chunks: Iterable[bytes], n: int = 16) -> str:
    """The first ``n`` hex digits of SHA-1 over the concatenated ``chunks``."""
    h = hashlib.sha1()
    for c in chunks:
        h.update(c)
    return h.hexdigest()[:n]


def file_key(path: str | Path, n: int = 16) -> str:
    """:func:`bytes_key` of a file's contents."""
    return bytes_key([Path(path).read_bytes()], n)
