"""Shared test set-up: make the top-level scripts importable and keep torch on few threads."""
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
# The real ActivityNet-1.3 annotations live beside the checkout in this environment only.
ANNOTATIONS = ROOT.parent / "shared" / "data" / "activitynet13_annotations.json"


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def anet_annotations():
    if not ANNOTATIONS.exists():
        pytest.skip(f"real ActivityNet-1.3 annotations not found at {ANNOTATIONS}")
    return ANNOTATIONS
