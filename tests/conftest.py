"""Shared fixtures. Tests needing ../shared are marked `shared` and skip with a clear reason when absent."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("COHORTSEG_SHARED", REPO.parent / "shared")).resolve()
# the workflow's default (inference.onednn): TensorFlow reads it at its first import, so tests that
# import it in-process compute as the infer jobs do
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")
SHARED_MISSING = "../shared (real MRI + pretrained models) is absent; see README 'Tests'"


def pytest_collection_modifyitems(config, items):
    if SHARED.is_dir():
        return
    skip = pytest.mark.skip(reason=f"{SHARED_MISSING} (looked in {SHARED})")
    for item in items:
        if "shared" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    if not SHARED.is_dir():
        pytest.skip(f"{SHARED_MISSING} (looked in {SHARED})")
    return SHARED


@pytest.fixture(scope="session")
def repo_dir() -> Path:
    return REPO


from runs import csa_run  # noqa: E402,F401  (session-scoped workflow runs shared by test modules)
