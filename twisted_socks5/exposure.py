"""
Whether ``twistd socks5`` starts exposed, and what it refuses then: an open
proxy (no password, no client allow-list) on an endpoint other hosts can
reach, at start and on every rules reload; metrics without a password; and
clients reaching the proxy host itself.
"""

from __future__ import annotations

import importlib
import ipaddress
from functools import partial
from typing import Any, Callable, Optional, Sequence

from twisted.internet.endpoints import serverFromString
from twisted.logger import Logger
from twisted.python import usage

from ._twisted import endpoint_address
from .rules import RulesError, RuleSet, RulesFile, open_relay_clients
from .selfnet import HostAddresses, default_host

# The namespace these warnings had before this module was split from tap.py.
log = Logger(namespace="twisted_socks5.tap")


def exposed(description: str) -> bool:
    """Whether a --listen endpoint may be reached from beyond this host."""
    from twisted.internet import reactor

    endpoint = serverFromString(reactor, description)
    if type(endpoint).__name__ == "UNIXServerEndpoint":
        return False
    address = endpoint_address(endpoint)
    if address is None:  # systemd, haproxy, ...: cannot tell, assume so
        return True
    interface = address[0]
    try:
        return not ipaddress.ip_address(interface.split("%", 1)[0]).is_loopback
    except ValueError:  # "" (all interfaces) or a name
        return True


def open_to(rules: Optional[RuleSet], explicit: bool = False) -> Optional[str]:
    """
    Who may relay without a password under ``rules`` (``None``: nobody);
    ``explicit``: SOCKS4 clients of a server that requires a password.
    """
    if rules is None:
        return None if explicit else "anyone"
    outside = open_relay_clients(rules, explicit)
    if outside is None:
        return None
    first, last = outside
    who = "SOCKS4 clients" if explicit else "clients"
    return f"{who} from {first} to {last} (outside 'allow from' networks)"


def refuse_open_rules(rules: RuleSet, explicit: bool = False) -> None:
    """The open-relay guard for a reloaded rules file: raises RulesError."""
    who = open_to(rules, explicit)
    if who is not None:
        raise RulesError(
            f"would make an open proxy ({who} may use it without a password); "
            "the rules in force stay",
            rules.source,
        )


def refuse_open_relay(
    listen: Sequence[str],
    anonymous: Callable[[], bool],
    policy: Any,
    protocols: Sequence[str] = ("socks5",),
) -> None:
    """
    Never become an open proxy by accident, at start or on SIGHUP: raise a
    usage error when an endpoint in ``listen`` is exposed, ``anonymous()``
    (asked only then) says a client may go without a password, and
    ``policy`` (the --rules file, or ``None``) lets some client outside its
    allow-list through.  Every protocol in ``protocols`` counts: SOCKS4
    has no password, so where one is required its clients are judged by
    the explicit ``allow from NETWORKS protocol socks4`` rules.
    """
    reachable = [d for d in listen if exposed(d)]
    if not reachable:
        return
    explicit = not anonymous()
    if explicit and "socks4" not in protocols:
        return
    rules = policy.rules if policy is not None else None
    who = open_to(rules, explicit)
    if who is not None:
        raise usage.UsageError(
            f"refusing to start an open proxy: {', '.join(reachable)} can be "
            f"reached from other hosts, and {who} may use it without a "
            "password.  Require one (--auth ...), or allow only your clients "
            "(--rules FILE with 'allow from YOUR/NET' and 'default deny'), or "
            "listen on loopback; --allow-open-relay starts it anyway."
        )
    if isinstance(policy, RulesFile):
        # The same guard on every reload: a rules file edited into an
        # open relay is refused, and the rules in force stay.
        policy.guard = partial(refuse_open_rules, explicit=explicit)


def warn_if_metrics_exposed(description: str) -> bool:
    """
    Metrics have no authentication: say so when their endpoint can be
    reached from other hosts (``tcp:9180`` listens on every interface).
    """
    if not exposed(description):
        return False
    log.warn(
        "--metrics {endpoint} can be reached from other hosts, without a "
        "password; give it interface=127.0.0.1 (or a management network)",
        endpoint=description,
        event="socks5.metrics_exposed",
    )
    return True


def protected_host(
    allow_self: bool, listen: Sequence[str], host: Optional[HostAddresses]
) -> Optional[HostAddresses]:
    """
    The proxy host's addresses to refuse as destinations (``host``, or this
    host's): when a listener is reachable from other hosts, unless
    ``allow_self`` (--allow-self-destinations).  On loopback only, clients
    are on this host already.
    """
    if allow_self:
        return None
    if not any(exposed(d) for d in listen):
        return None
    return host or default_host()


def check_limits_store(options: Any) -> None:
    """
    The rules' limits and their store agree with the rest of the options:
    never split a per-user limit between worker processes that each count
    their own share (``--workers`` needs a shared store), and a Redis store
    needs its module.
    """
    store = options["limits-store"]
    policy = options.policy
    if store == "memory":
        if options["workers"] > 1 and getattr(policy, "limits", ()):
            raise usage.UsageError(
                f"--rules has limit lines, which --workers {options['workers']} "
                "would split: each process would count only its own sessions, "
                "requests and bytes, letting a user have up to "
                f"{options['workers']} times a limit.  Share the counters "
                "with --limits-store redis://HOST:PORT/DB (see docs/limits.rst)."
            )
        return
    if options["state-file"]:
        raise usage.UsageError(
            "--state-file is for --limits-store memory (Redis keeps the usage)"
        )
    try:
        redisstore = importlib.import_module("twisted_socks5.redisstore")
    except ImportError as e:
        raise usage.UsageError(
            f"--limits-store {store.split('://')[0]}://: the Redis store "
            f"(twisted_socks5.redisstore) cannot be loaded: {e}"
        ) from None
    try:  # i14-redis: the URL's parameters and CA file, at start
        redisstore.check_url(store)
    except ValueError as e:
        raise usage.UsageError(f"--limits-store: {e}") from None


def refuse_split_limits_on_reload(policy: Any, store: str) -> None:
    """
    In a worker process with the memory store: a rules file reloaded with
    ``limit`` lines is refused (the rules in force stay), as it would be at
    start, since each worker would count only its own share.
    """
    if store != "memory" or not isinstance(policy, RulesFile):
        return
    before = policy.guard

    def guard(rules: RuleSet) -> None:
        if before is not None:
            before(rules)
        if rules.limits:
            raise RulesError(
                "limit lines with --workers need a shared store "
                "(--limits-store redis://HOST:PORT/DB): each worker would "
                "count only its own share",
                rules.source,
                rules.limits[0].line,
            )

    policy.guard = guard


def refuse_console_without_password(description: str, checkers: Sequence[Any]) -> None:
    """
    The live console (--admin) closes tunnels and reloads the
    configuration: it never starts without --admin-auth.  The message says
    who could otherwise use it: other hosts, or every local user and
    every page a local browser opens.
    """
    if checkers:
        return
    who = (
        "it can be reached from other hosts"
        if exposed(description)
        else "every local user (and any web page a browser here opens) could use it"
    )
    raise usage.UsageError(
        f"refusing to start the console on {description} without a password: "
        f"{who}.  Give --admin-auth (e.g. --admin-auth file:/etc/socks5-admins)."
    )


def warn_if_console_in_clear(description: str) -> bool:
    """Passwords cross the network in clear to a plain TCP console: say so."""
    if description.startswith(("ssl:", "tls:")) or not exposed(description):
        return False
    log.warn(
        "--admin {endpoint} can be reached from other hosts without TLS: "
        "console passwords and cookies cross the network in clear; use ssl:",
        endpoint=description,
        event="socks5.console_in_clear",
    )
    return True
