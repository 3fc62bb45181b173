"""The in-process trainer tests share one process group: DeepSpeed keeps its communication backend for the life of
the process, so a group destroyed after one test module could not be started again for the next. It is shut down
(with the CPU all-reduce segments it leaves in /dev/shm) once, at the end of the session."""

from __future__ import annotations

import pytest

from msplora_dist.dist.process import shutdown_distributed


@pytest.fixture(scope="session", autouse=True)
def _process_group_for_the_session():
    yield
    shutdown_distributed()
