import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Files diffusekit writes for itself (the shipped tokenizer, unpacked) go to a temp folder, not ~/.cache.
os.environ["DIFFUSEKIT_CACHE"] = tempfile.mkdtemp(prefix="diffusekit-test-cache-")
sys.path.insert(0, str(Path(__file__).parent))

import pytest  # noqa: E402
import torch  # noqa: E402

# Tiny models run many small kernels: one thread avoids thread start-up costs and contention
# (10x faster on a 2-core machine). Full-size checks ask for every core with `all_threads`.
torch.set_num_threads(1)


@pytest.fixture
def all_threads():
    torch.set_num_threads(os.cpu_count() or 1)
    yield
    torch.set_num_threads(1)
