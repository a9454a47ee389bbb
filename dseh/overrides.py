"""The `key.sub=value` override syntax shared by the CLI (-S/--set), `dvc exp run -S` and the Kubeflow
pipeline's `overrides` parameter: the value is YAML."""

from __future__ import annotations

from typing import Any

import yaml

from dseh.errors import DsehError


def parse_override(text: str) -> tuple[list[str], Any]:
    """`labnet.epochs=[5,3]` -> (['labnet', 'epochs'], [5, 3]); the value is parsed as YAML,
    the same syntax as `dvc exp run -S`."""
    if "=" not in text:
        raise DsehError(f"override '{text}' is not of the form key.sub=value")
    key, value = text.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise DsehError(f"override '{text}' has an empty key part")
    try:
        parsed = yaml.safe_load(value) if value.strip() else ""
    except yaml.YAMLError as exc:
        raise DsehError(f"override '{text}': value is not valid YAML ({exc})") from exc
    return parts, parsed


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Return a copy of the raw params dict with each `key.sub=value` applied."""
    out = yaml.safe_load(yaml.safe_dump(raw)) or {}
    for text in overrides:
        parts, value = parse_override(text)
        node = out
        for part in parts[:-1]:
            nxt = node.setdefault(part, {})
            if not isinstance(nxt, dict):
                raise DsehError(f"override '{text}': '{part}' is not a section")
            node = nxt
        node[parts[-1]] = value
    return out
