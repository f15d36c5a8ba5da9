"""Small helpers shared by the tests."""

from __future__ import annotations


def set_by_path(target, dotted_key: str, value) -> None:
    """`set_by_path(cfg, "a.b.c", v)` does `cfg["a"]["b"]["c"] = v` (dicts and ConfigDicts alike)."""
    *parents, last = dotted_key.split(".")
    for p in parents:
        target = target[p]
    target[last] = value
