import os
import uuid

import pytest


@pytest.fixture
def shm_name():
    """A shared-memory name no other test (or test run) uses; short enough for macOS (31 chars)."""
    return f"rtdt_{os.getpid() % 100000}_{uuid.uuid4().hex[:8]}"
