"""``knob``: a config field with its one-line meaning. A leaf module (dataclasses only), so the config
dataclasses that live with their components (each network's, in pdiff/networks/) and pdiff/config.py,
which gathers them, both take it from here."""
from __future__ import annotations

from dataclasses import field


def knob(default, meaning: str):
    """A config field and its one-line meaning, which `pdiff config` prints (lists get a fresh copy
    per instance)."""
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"doc": meaning})
    return field(default=default, metadata={"doc": meaning})
