"""Test settings: no network, and every cache inside pytest's temporary area.

HF_HUB_OFFLINE must be set before transformers / huggingface_hub / datasets are imported, which is
why it happens here, at import time of the conftest, not in a fixture.
"""

import os
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Keep datasets' cache out of the user's home; a session-wide folder so tests can share builds.
_CACHE = os.environ.setdefault("REPBLEND_TEST_CACHE", tempfile.mkdtemp(prefix="repblend-test-cache-"))
os.environ.setdefault("HF_DATASETS_CACHE", os.path.join(_CACHE, "datasets"))

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
