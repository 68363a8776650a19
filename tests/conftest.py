import gc
import os
import sys
from typing import Iterator

import pytest
from twisted.internet.testing import EventLoggingObserver
from twisted.logger import globalLogPublisher

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


@pytest.fixture
def log_events() -> Iterator[EventLoggingObserver]:
    """Every event logged during the test."""
    observer = EventLoggingObserver()
    globalLogPublisher.addObserver(observer)
    yield observer
    globalLogPublisher.removeObserver(observer)


@pytest.fixture
def events(log_events: EventLoggingObserver) -> EventLoggingObserver:
    """The same observer under the shorter name many tests use."""
    return log_events
