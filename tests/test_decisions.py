"""
The rules answer with one type, :class:`Decision`, everywhere; the shapes
public hooks had before (a connector's ``check``, bool hooks) are adapters.
"""

from __future__ import annotations

from typing import List, Optional, Set

import pytest
from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.address import IPv4Address
from twisted.internet.testing import MemoryReactorClock

from twisted_socks5.bind import BindWaiter
from twisted_socks5.outbound import denial_check, pick_allowed
from twisted_socks5.replies import PolicyDenied
from twisted_socks5.rules import Decision, allows

IPS = ["10.0.0.1", "10.0.0.2", "::1", "192.0.2.7"]


@given(st.lists(st.sampled_from(IPS)), st.sets(st.sampled_from(IPS)))
def test_pick_allowed_gives_the_first_allowed_address_and_its_decision(
    addresses: List[str], denied: Set[str]
) -> None:
    def decide(ip: str) -> Decision:
        if ip in denied:
            return Decision(False, f"deny {ip}")
        return Decision(True, f"allow {ip}", via=f"route-{ip}")

    allowed = [ip for ip in addresses if ip not in denied]
    if allowed:
        ip, decision = pick_allowed(addresses, decide)
        assert ip == allowed[0]
        assert decision.allowed and decision.via == f"route-{ip}"
    else:
        with pytest.raises(PolicyDenied) as caught:
            pick_allowed(addresses, decide)
        first_rule = f"deny {addresses[0]}" if addresses else "no address"
        assert caught.value.rule == first_rule


def test_denial_check_is_the_connector_apis_shape_of_a_decision() -> None:
    def decide(ip: str) -> Decision:
        return Decision(ip == "192.0.2.1", f"rule for {ip}")

    check = denial_check(decide)
    assert check("192.0.2.1") is None
    assert check("192.0.2.2") == "rule for 192.0.2.2"


def test_allows_reads_a_decision_and_a_bool_from_an_older_hook() -> None:
    assert allows(Decision(True, "r")) is True
    assert allows(Decision(False, "r")) is False
    assert allows(Decision(True, "r", final=False)) is True
    assert allows(True) is True
    assert allows(False) is False


def _waiter_answering(answer: Optional[object]) -> BindWaiter:
    hook = None if answer is None else (lambda ip: answer)
    waiter = BindWaiter(MemoryReactorClock(), None, 30, hook)  # type: ignore[arg-type]
    waiter.listen("127.0.0.1")
    return waiter


@pytest.mark.parametrize(
    ("answer", "accepted"),
    [
        (Decision(False, "deny from 127.0.0.9"), False),
        (Decision(True, "allow"), True),
        (False, False),
        (True, True),
        (None, True),
    ],
)
def test_bind_peer_hook_answers_with_a_decision(
    answer: Optional[object], accepted: bool
) -> None:
    waiter = _waiter_answering(answer)
    protocol = waiter.buildProtocol(IPv4Address("TCP", "127.0.0.9", 5555))
    assert (protocol is not None) is accepted
    assert waiter.refused == (0 if accepted else 1)
