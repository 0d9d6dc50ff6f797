"""Shared test setup: the repository root on sys.path, and the optional shared assets directory."""

import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# ../shared next to the repository: present on the maintainers' machines, absent for most users
ASSETS = ROOT.parent / "shared" / "assets"


@pytest.fixture
def smollm2_dir() -> Path:
    """The SmolLM2-135M-Instruct tokenizer + config (no weights); the test is skipped when absent."""
    path = ASSETS / "smollm2-135m-instruct"
    if not (path / "tokenizer.json").exists():
        pytest.skip(f"{path} not present (shared test assets are optional)")
    return path


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models gain nothing from intra-op threads, and on a busy 2-core machine OpenMP barriers
    make each small matmul 100x slower. Test modules of tiny models ask for it with
    `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
