import os
import uuid

import pytest


@pytest.fixture
def shm_name():
    """A shared-memory name no other test (or test run) uses; short enough for macOS (31 chars)."""
    return f"rtdt_{os.getpid() % 100000}_{uuid.uuid4().hex[:8]}"


@pytest.fixture
def project():
    """A TouchDesigner stand-in project (2023 build); engines its components launched are stopped after."""
    import td_standin as td
    from td_bridge.touchdesigner import launcher

    p = td.Project(build=2023)
    yield p
    launcher.stop_all(wait=True, grace_s=0.5)
    launcher.forget_stopped()
    p.exit()
