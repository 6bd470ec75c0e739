"""Test-wide settings: offline, quiet, few threads, deterministic.

Set here, not inherited: ``make test`` must give the same result whatever the calling shell
exports (``WANDB_MODE=online``, a thread count, ...). Subprocesses started by the tests
inherit these values.
"""

import os
import tempfile

for _name in list(os.environ):
    if _name.startswith("WANDB_") or _name.startswith("LEVERLM_"):
        del os.environ[_name]
os.environ.update(
    {
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "WANDB_MODE": "disabled",
        "TOKENIZERS_PARALLELISM": "false",
        "OMP_NUM_THREADS": "1",
        # caches (e.g. verified shard checksums) of this test session only
        "XDG_CACHE_HOME": tempfile.mkdtemp(prefix="leverlm-tests-cache-"),
    }
)

import pytest  # noqa: E402


@pytest.fixture(autouse=True, scope="session")
def _torch_threads():
    import torch

    torch.set_num_threads(1)
    yield
