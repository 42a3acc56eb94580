"""Nested data (configs, stage results, metrics) as flat ``{"a.b": value}`` maps: the one walker behind MLflow
params, KFP artifact metadata, tracker metrics, config comparisons and the compile-time credential check.

Example:
    >>> flatten({"test": {"auc": 0.9, "ci": [0.8, 1.0]}, "head": "abmil", "none": {}})
    {'test.auc': 0.9, 'test.ci': [0.8, 1.0], 'head': 'abmil'}
    >>> flatten({"test": {"auc": 0.9}}, sep="_")
    {'test_auc': 0.9}
    >>> flatten({"a": [{"uri": "x"}], "b": {}}, lists=True, keep_empty=True)
    {'a[0].uri': 'x', 'b': {}}
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

KeyPath = tuple[str | int, ...]


def leaves(
    data: Mapping[str, Any], *, lists: bool = False, keep_empty: bool = False
) -> Iterator[tuple[KeyPath, Any]]:
    """``(path, value)`` for every leaf of nested mappings, depth first in insertion order.

    ``lists``: descend into lists and tuples too (their items' paths end in the index, an ``int``); otherwise a
    list is a leaf. ``keep_empty``: an empty mapping is a leaf (else it yields nothing).
    """
    yield from _walk(data, (), lists, keep_empty)


def _walk(value: Any, path: KeyPath, lists: bool, keep_empty: bool) -> Iterator[tuple[KeyPath, Any]]:
    if isinstance(value, Mapping) and (value or not keep_empty or not path):
        for key, child in value.items():
            yield from _walk(child, (*path, str(key)), lists, keep_empty)
    elif lists and isinstance(value, (list, tuple)):
        for i, child in enumerate(value):
            yield from _walk(child, (*path, i), lists, keep_empty)
    else:
        yield path, value


def join(path: KeyPath, sep: str = ".") -> str:
    """``("a", "b", 0, "c")`` -> ``"a.b[0].c"`` (indices in brackets, keys joined by ``sep``).

    >>> join(("test", "auc"), "_"), join(("a", 0, "uri"))
    ('test_auc', 'a[0].uri')
    """
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f"{sep}{part}" if out else part)
    return out


def flatten(
    data: Mapping[str, Any], sep: str = ".", *, lists: bool = False, keep_empty: bool = False
) -> dict[str, Any]:
    """``{joined path: leaf}`` of :func:`leaves` (see there for ``lists`` and ``keep_empty``)."""
    return {join(path, sep): value for path, value in leaves(data, lists=lists, keep_empty=keep_empty)}
