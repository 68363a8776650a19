"""The default realm gives a proxy user and nothing else."""

from __future__ import annotations

import pytest
from twisted.cred.portal import IRealm

from twisted_socks5.auth import IProxyUser, ProxyRealm


def test_the_realm_gives_the_user_name_as_the_avatar() -> None:
    interface, avatar, logout = ProxyRealm().requestAvatar(b"alice", None, IProxyUser)
    assert (interface, avatar) == (IProxyUser, "alice")
    logout()


def test_the_realm_refuses_any_other_interface() -> None:
    with pytest.raises(NotImplementedError):
        ProxyRealm().requestAvatar(b"alice", None, IRealm)
