"""docs/config.md documents every config field, so the reference cannot silently fall behind."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from moesaic.configs import Config
from moesaic.model.attention import registered


def _fields(cls: type, prefix: str = "") -> list[str]:
    out = []
    for f in dataclasses.fields(cls):
        name = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(f.default_factory if f.default_factory is not dataclasses.MISSING else None):
            out += _fields(f.default_factory, f"{name}.")
        else:
            out.append(name)
    return out


def test_every_config_field_is_documented() -> None:
    doc = (Path(__file__).resolve().parents[1] / "docs" / "config.md").read_text()
    fields = _fields(Config)
    assert len(fields) > 80
    missing = [f for f in fields if f"`{f}`" not in doc]
    assert not missing, f"add these to docs/config.md: {missing}"


def test_every_attention_kind_field_is_documented() -> None:
    doc = (Path(__file__).resolve().parents[1] / "docs" / "config.md").read_text()
    missing = [f"{kind}.{f.name}" for kind, cls in registered().items() for f in dataclasses.fields(cls)
               if f.name != "kind" and f"`{kind}.{f.name}`" not in doc]
    assert not missing, f"add these to docs/config.md: {missing}"
