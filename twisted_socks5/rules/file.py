"""
The ``--rules`` file of ``twistd socks5``: a policy that SIGHUP re-reads,
keeping the rules in force when the new file is broken or refused.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

from zope.interface import classImplements

from ..selfnet import HostAddresses
from .decision import IPolicy
from .ruleset import RuleSet


class RulesFile:
    """
    An access-rules file as an :class:`~twisted_socks5.rules.IPolicy` that
    :meth:`reload` re-reads; a file that fails to parse keeps the old rules.
    ``host`` is the ``self`` network, whose addresses a reload reads again.
    ``guard``, when set, sees each reloaded rule set first and raises to
    keep the old one (the open-relay guard of an exposed server).
    """

    def __init__(self, path: str, host: Optional[HostAddresses] = None) -> None:
        self.path = path
        self.host = host
        self.guard: Optional[Callable[[RuleSet], None]] = None
        self.rules = RuleSet.from_file(path, host)

    def reload(self) -> None:
        if self.host is not None:
            self.host.reload()
        rules = RuleSet.from_file(self.path, self.host)  # raises: old stay
        if self.guard is not None:
            self.guard(rules)
        self.rules = rules

    def check_client(self, client: Any) -> Any:
        return self.rules.check_client(client)

    def check_request(self, *args: Any, **kwargs: Any) -> Any:
        return self.rules.check_request(*args, **kwargs)

    def check_resolved(self, *args: Any, **kwargs: Any) -> Any:
        return self.rules.check_resolved(*args, **kwargs)

    @property
    def limits(self) -> Any:
        """The ``limit`` lines of the rules in force."""
        return self.rules.limits

    def limits_for(self, *args: Any) -> Any:
        return self.rules.limits_for(*args)

    def describe(self) -> str:
        return self.rules.describe()

    def __repr__(self) -> str:
        return f"<rules {self.path}>"


classImplements(RulesFile, IPolicy)
