"""The test helpers that wait give up with a message instead of hanging."""

from __future__ import annotations

from typing import Any

import helpers
import pytest
import pytest_twisted
from twisted.internet import defer


@pytest_twisted.ensureDeferred
async def test_until_gives_up_naming_what_never_happened(monkeypatch: Any) -> None:
    monkeypatch.setattr(helpers, "GIVE_UP_AFTER", 0.01)
    with pytest.raises(AssertionError, match="never happened: the impossible"):
        await helpers.until(lambda: False, "the impossible")


@pytest_twisted.ensureDeferred
async def test_within_gives_up_on_a_deferred_that_never_fires(monkeypatch: Any) -> None:
    monkeypatch.setattr(helpers, "GIVE_UP_AFTER", 0.01)
    with pytest.raises(AssertionError, match="never happened: the peer closed"):
        await helpers.within(defer.Deferred(), "the peer closed")
    assert await helpers.within(defer.succeed(7), "at once") == 7
