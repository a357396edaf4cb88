"""Shared pytest setup: the project root on sys.path and the location of the public corpus."""

import sys
from pathlib import Path

import numpy as np
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


@pytest.fixture(autouse=True)
def _fresh_random_data():
    """Every test draws the same random weights and inputs (graphs.rand) whatever ran before it in the process,
    so a test's data does not depend on the test order or on how pytest-xdist shares tests out."""
    import graphs
    graphs.RNG = np.random.default_rng(0)
