"""Shared pytest setup: the project root on sys.path and the location of the public corpus."""

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
CORPUS = ROOT.parent / "shared" / "corpus"


@pytest.fixture
def corpus() -> Path:
    """Path of ../shared/corpus; skips the test when it is absent."""
    if not (CORPUS / "models").is_dir():
        pytest.skip("../shared/corpus is not present")
    return CORPUS
