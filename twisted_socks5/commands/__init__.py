"""
The SOCKS commands, one handler each: the server protocol parses and
validates a request, asks the rules, then hands it to the handler
registered for its command, which does the work and sends the reply.

A new command (or another protocol's request mapped onto one) is one more
:class:`ICommandHandler` in :data:`HANDLERS`, not another branch in the
protocol.
"""

from __future__ import annotations

from typing import Dict

from ..codec import Command
from .base import ICommandHandler, RequestContext, handler_for
from .bind import BIND, BindHandler
from .connect import CONNECT, ConnectHandler
from .udp import ASSOCIATE, AssociateHandler

#: The handler of each command; a factory copies it (``handlers``).
HANDLERS: Dict[Command, ICommandHandler] = {
    Command.CONNECT: CONNECT,
    Command.BIND: BIND,
    Command.UDP_ASSOCIATE: ASSOCIATE,
}

__all__ = [
    "HANDLERS",
    "ICommandHandler",
    "RequestContext",
    "handler_for",
    "ConnectHandler",
    "BindHandler",
    "AssociateHandler",
]
