"""The versioned JSON Schema of deploy.json, shipped in every package and checked on write and read."""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

import jsonschema

from compiler.errors import PackageError

SCHEMA_VERSION = "1.2"
SCHEMA_FILE = "deploy.schema.json"
SCHEMA_PATH = Path(__file__).resolve().parent / SCHEMA_FILE


@lru_cache(maxsize=1)
def schema() -> dict:
    """The deploy.json JSON Schema (draft 2020-12)."""
    return json.loads(SCHEMA_PATH.read_text())


def validate_descriptor(descriptor: dict) -> None:
    """Raise PackageError naming the first schema violation (its JSON path) in `descriptor`."""
    validator = jsonschema.Draft202012Validator(schema())
    error = next(iter(sorted(validator.iter_errors(descriptor), key=lambda e: list(e.absolute_path))), None)
    if error is not None:
        path = "/".join(str(p) for p in error.absolute_path) or "(root)"
        raise PackageError(f"deploy.json does not match schema {SCHEMA_VERSION} at {path}: {error.message}")
