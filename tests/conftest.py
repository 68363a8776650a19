import gc
import os
import sys
from typing import Iterator

import pytest

# Let tests import their helpers module as a plain module.
sys.path.insert(0, os.path.dirname(__file__))


@pytest.fixture(autouse=True)
def _unfreeze_the_heap() -> Iterator[None]:
    """
    ``makeService`` freezes the heap once the reactor runs (``gc.freeze``),
    and under pytest-twisted the reactor is running: give the test process
    its garbage collector back after each test.
    """
    yield
    if gc.get_freeze_count():
        gc.unfreeze()
