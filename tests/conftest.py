"""Shared fixtures. Each area keeps its own fixtures in its folder's conftest.py."""

from __future__ import annotations

import os
import secrets
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # tests/ helpers: tiny_model, servers, ...
# every process the tests start inherits this mark: the next run's real node finds by it
# what this run left running if it is killed (servers/cluster/node.py, RUN_ENV)
os.environ.setdefault("PSFT_TEST_RUN", f"{os.getpid()}-{secrets.token_hex(4)}")

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Llama with a trained BPE tokenizer and a chat template."""
    from tiny_model import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("tiny-llama"))
