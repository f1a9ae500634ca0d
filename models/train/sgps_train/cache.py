"""Writing the recipe's work-dir caches so that an interrupted run never leaves a half-written one."""

from __future__ import annotations

from pathlib import Path


def save_atomic(path: Path, write) -> None:
    """`write(tmp)` then rename over `path`: a cache file either exists whole or not at all."""
    tmp = path.with_name(path.name + ".tmp")  # unique per file (ft_<key>.json and .pt share a stem)
    write(tmp)
    tmp.replace(path)
