"""
The documentation's code and claims, checked: the examples in docs/examples
run as the pages say, and the tables that name code or tests still match it.
"""

from __future__ import annotations

import csv
import errno
import importlib
import os
import re
import shutil
import sys
from pathlib import Path
from typing import Any, List, Optional, Tuple

import pytest
import pytest_twisted
from twisted.cred.credentials import UsernamePassword as TextCredentials
from twisted.cred.error import UnauthorizedLogin
from twisted.cred.portal import Portal
from twisted.cred.strcred import findCheckerFactories
from twisted.internet import defer
from twisted.internet.address import IPv4Address
from twisted.internet.interfaces import IProtocolFactory
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.plugin import getPlugins
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import Site
from zope.interface import implementer
from zope.interface.interface import InterfaceClass
from zope.interface.verify import verifyObject

import twisted.plugins
from twisted_socks5.auth import (
    IProxyUser,
    NoAuthAuthenticator,
    ProxyRealm,
    UsernamePassword,
    UsernamePasswordAuthenticator,
)
from twisted_socks5.codec import (
    Address,
    AddressType,
    Command,
    Reply,
    ReplyCode,
    Request,
    UserPassRequest,
)
from twisted_socks5.interfaces import (
    IAuthenticator,
    IAuthenticatorFactory,
    IAuthNegotiation,
)
from twisted_socks5.outbound import IOutboundConnector
from twisted_socks5.replies import reply_for_failure
from twisted_socks5.server import SOCKS5ServerFactory, SOCKS5ServerProtocol
from twisted_socks5.tap import Options, SOCKS5Service, build_authenticators

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
EXAMPLES = DOCS / "examples"

CLIENT = IPv4Address("TCP", "127.0.0.1", 40000)
SERVER = IPv4Address("TCP", "127.0.0.1", 1080)
TARGET = Address(AddressType.DOMAIN, "example.test", 443)
CONNECT = Request(Command.CONNECT, TARGET).to_bytes()
TOKEN = b"pT0k3n-for-alice-0123456789abcdefghijklmnopqrstuvw"


def example(name: str) -> Any:
    """Import a module of docs/examples, as a user with it on sys.path would."""
    if str(EXAMPLES) not in sys.path:
        sys.path.insert(0, str(EXAMPLES))
    return importlib.import_module(name)


tokens_example = example("socks5_tokens")


@pytest.fixture
def token_file(tmp_path: Path) -> Path:
    path = tmp_path / "tokens"
    digest = tokens_example.digest(TOKEN).hex()
    path.write_text(f"# issued 2024-05-01\nalice {digest}\n", encoding="utf-8")
    return path


# --------------------------------------------------------------------------
# An in-memory server: StringTransport in, recorded connects out


@implementer(IOutboundConnector)
class RecordingConnector:
    """Records CONNECTs and leaves them pending (the tests stop at the reply)."""

    timeout = 10.0

    def __init__(self) -> None:
        self.calls: List[Address] = []

    def connect(
        self, address: Address, factory: IProtocolFactory, check: Any = None
    ) -> Any:
        self.calls.append(address)
        return defer.Deferred()

    def resolve(self, name: str) -> Any:
        return defer.Deferred()


class Served:
    """A SOCKS5ServerFactory with one client connected over a StringTransport."""

    def __init__(self, authenticators: List[Any], **kwargs: Any) -> None:
        kwargs.setdefault("connector", RecordingConnector())
        self.reactor = MemoryReactorClock()
        self.factory = SOCKS5ServerFactory(
            authenticators, reactor=self.reactor, **kwargs
        )
        protocol = self.factory.buildProtocol(CLIENT)
        assert isinstance(protocol, SOCKS5ServerProtocol)
        self.protocol = protocol
        self.transport = StringTransport(hostAddress=SERVER, peerAddress=CLIENT)
        self.protocol.makeConnection(self.transport)

    @property
    def connector(self) -> Any:
        return self.factory.connector

    def send(self, data: bytes) -> None:
        self.protocol.dataReceived(data)

    def take(self) -> bytes:
        value = self.transport.value()
        self.transport.clear()
        return bytes(value)

    @property
    def closing(self) -> bool:
        return bool(self.transport.disconnecting or self.transport.disconnected)


def token_message(token: bytes) -> bytes:
    return bytes((1, len(token))) + token


def token_server(token_file: Path, **kwargs: Any) -> Served:
    tokens = tokens_example.TokenFile(str(token_file))
    return Served([tokens_example.TokenAuthenticator(tokens)], **kwargs)


# --------------------------------------------------------------------------
# METHOD 0x80 (docs/examples/socks5_tokens.py), through the server


def test_token_authenticator_provides_the_interfaces(token_file: Path) -> None:
    tokens = tokens_example.TokenFile(str(token_file))
    authenticator = tokens_example.TokenAuthenticator(tokens)
    assert verifyObject(IAuthenticator, authenticator)
    assert verifyObject(IAuthNegotiation, authenticator.negotiate(CLIENT))
    assert verifyObject(
        IAuthenticatorFactory, tokens_example.TokenAuthenticatorFactory()
    )


def test_token_method_lets_the_token_holder_in(token_file: Path) -> None:
    s = token_server(token_file)
    s.send(b"\x05\x02\x02\x80")  # the client offers 0x02 and 0x80
    assert s.take() == b"\x05\x80"
    s.send(token_message(TOKEN) + CONNECT)
    assert s.take() == b"\x01\x00"
    assert s.connector.calls == [TARGET]
    assert s.protocol.user == "alice"
    assert not s.closing


def test_token_method_wrong_token_gets_status_1_and_a_close(token_file: Path) -> None:
    s = token_server(token_file)
    s.send(b"\x05\x01\x80" + token_message(b"not-a-token") + CONNECT)
    assert s.take() == b"\x05\x80\x01\x01"
    assert s.closing
    assert s.connector.calls == []  # the pipelined request is never honoured
    assert s.protocol.outcome == "authentication failed"


def test_token_failures_feed_the_login_throttle(token_file: Path) -> None:
    s = token_server(token_file)
    s.factory.limits.auth_failures = 1
    s.send(b"\x05\x01\x80" + token_message(b"guess"))
    assert s.factory.limits.refusal("127.0.0.1") is not None


def test_token_method_byte_by_byte(token_file: Path) -> None:
    s = token_server(token_file)
    for byte in b"\x05\x01\x80" + token_message(TOKEN) + CONNECT:
        s.send(bytes((byte,)))
    assert s.take() == b"\x05\x80\x01\x00"
    assert s.connector.calls == [TARGET]


@pytest.mark.parametrize(
    "message",
    [b"\x02\x05token", b"\x01\x00", b"\x01\xff" + b"x" * 255 + b"\x00"],
    ids=["bad-version", "empty-token", "unknown-255-byte-token"],
)
def test_token_method_bad_messages(token_file: Path, message: bytes) -> None:
    s = token_server(token_file)
    s.send(b"\x05\x01\x80")
    s.take()
    s.send(message)
    if message.startswith(b"\x01\xff"):
        assert s.take() == b"\x01\x01"  # well-formed, unknown: a status
    else:
        assert s.take() == b""  # unreadable: no status, just a close
    assert s.closing


def test_token_method_not_offered_without_a_common_method(token_file: Path) -> None:
    s = token_server(token_file)
    s.send(b"\x05\x01\x02")
    assert s.take() == b"\x05\xff"
    assert s.closing


def test_token_file_is_reread_and_a_broken_file_keeps_the_old_tokens(
    token_file: Path,
) -> None:
    tokens = tokens_example.TokenFile(str(token_file))
    assert tokens.owner(TOKEN) == "alice"
    new = b"a-new-token-for-bob-0123456789"
    token_file.write_text(f"bob {tokens_example.digest(new).hex()}\n")
    os.utime(token_file, (1, 1))  # a new mtime, whatever the clock's resolution
    assert tokens.owner(new) == "bob"
    assert tokens.owner(TOKEN) is None
    token_file.write_text("this line is broken\n")
    os.utime(token_file, (2, 2))
    assert tokens.owner(new) == "bob"


def test_token_file_must_be_valid_at_start(tmp_path: Path) -> None:
    path = tmp_path / "tokens"
    path.write_text("alice 1234\n")
    with pytest.raises(ValueError, match="line 1"):
        tokens_example.TokenFile(str(path))
    with pytest.raises(OSError):
        tokens_example.TokenFile(str(tmp_path / "missing"))


def test_new_token_line_admits_the_token(tmp_path: Path) -> None:
    token, line = tokens_example.new_token("carol")
    path = tmp_path / "tokens"
    path.write_text(line + "\n")
    tokens = tokens_example.TokenFile(str(path))
    assert tokens.owner(token.encode("ascii")) == "carol"


# --------------------------------------------------------------------------
# The twisted.cred checker, through a Portal and through RFC 1929


def login(portal: Portal, credentials: Any) -> Any:
    results: List[Any] = []
    portal.login(credentials, None, IProxyUser).addBoth(results.append)
    (result,) = results
    return result


def test_checker_through_a_portal(token_file: Path) -> None:
    checker = tokens_example.TokenChecker(tokens_example.TokenFile(str(token_file)))
    portal = Portal(ProxyRealm(), [checker])
    interface, avatar, logout = login(portal, UsernamePassword(b"alice", TOKEN))
    assert (interface, avatar) == (IProxyUser, "alice")
    # twisted.cred's own credentials carry text: accepted too.
    _, avatar, _ = login(portal, TextCredentials("alice", TOKEN.decode()))
    assert avatar == "alice"
    for credentials in (
        UsernamePassword(b"bob", TOKEN),  # someone else's token
        UsernamePassword(b"alice", b"wrong"),
    ):
        failure = login(portal, credentials)
        assert isinstance(failure, Failure)
        assert failure.check(UnauthorizedLogin)


def test_checker_behind_rfc1929(token_file: Path) -> None:
    checker = tokens_example.TokenChecker(tokens_example.TokenFile(str(token_file)))
    s = Served([UsernamePasswordAuthenticator.from_checkers(checker)])
    s.send(b"\x05\x01\x02" + UserPassRequest(b"alice", TOKEN).to_bytes() + CONNECT)
    assert s.take() == b"\x05\x02\x01\x00"
    assert s.protocol.user == "alice"
    assert s.connector.calls == [TARGET]


def test_sighup_reload_reaches_the_checker(token_file: Path) -> None:
    tokens = tokens_example.TokenFile(str(token_file))
    checker = tokens_example.TokenChecker(tokens)
    factory = SOCKS5ServerFactory(
        [UsernamePasswordAuthenticator.from_checkers(checker)],
        reactor=MemoryReactorClock(),
    )
    assert checker in factory.reloadables()
    new = b"a-token-issued-after-start-0123456789"
    stat = token_file.stat()
    token_file.write_text(f"alice {tokens_example.digest(new).hex()}\n")
    os.utime(token_file, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # same mtime
    factory.reload()  # what SIGHUP does
    assert tokens.owner(new) == "alice"
    assert tokens.owner(TOKEN) is None


def test_checker_factory_rejects_a_missing_argument() -> None:
    with pytest.raises(ValueError):
        tokens_example.TokenCheckerFactory().generateChecker("")
    with pytest.raises(ValueError):
        tokens_example.TokenAuthenticatorFactory().build("", None)


# --------------------------------------------------------------------------
# Both found by `twistd socks5` as plugins


@pytest.fixture
def example_plugins(tmp_path: Path, monkeypatch: Any) -> None:
    """docs/examples/twisted/plugins on the plugin path (its cache in tmp)."""
    plugins = tmp_path / "twisted" / "plugins"
    plugins.mkdir(parents=True)
    shutil.copy(EXAMPLES / "twisted" / "plugins" / "socks5_tokens_plugin.py", plugins)
    monkeypatch.setattr(
        twisted.plugins, "__path__", [*twisted.plugins.__path__, str(plugins)]
    )


def test_plugins_are_found_by_name(example_plugins: None) -> None:
    methods = {f.name: f for f in getPlugins(IAuthenticatorFactory)}
    assert "token" in methods
    assert verifyObject(IAuthenticatorFactory, methods["token"])
    assert "tokens" in {f.authType for f in findCheckerFactories()}


def test_twistd_socks5_options_build_both(
    example_plugins: None, token_file: Path
) -> None:
    options = Options()
    options.parseOptions(
        ["--method", f"token:{token_file}", "--auth", f"tokens:{token_file}"]
    )
    authenticators = build_authenticators(options)
    assert [a.method for a in authenticators] == [0x80, 0x02]
    s = Served(authenticators)
    s.send(b"\x05\x02\x02\x80")
    assert s.take() == b"\x05\x80"  # plugin methods come first


# --------------------------------------------------------------------------
# Embedding (docs/examples/socks5_embedding.py, socks5_connectors.py, proxy.tac)


def test_make_proxy_service_listens_on_each_endpoint() -> None:
    embedding = example("socks5_embedding")
    reactor = MemoryReactorClock()
    service = embedding.make_proxy_service(
        reactor, ["tcp:1080:interface=127.0.0.1", "tcp:1080:interface=::1"]
    )
    assert isinstance(service, SOCKS5Service)
    service.startService()
    try:
        assert [(p[0], p[3]) for p in reactor.tcpServers] == [
            (1080, "127.0.0.1"),
            (1080, "::1"),
        ]
        assert reactor.tcpServers[0][1] is service.factory
        assert [a.name for a in service.factory.authenticators] == ["none"]
        assert service.factory.limits.max_per_client == 64
    finally:
        service.stopService()


def test_make_factory_with_checkers_asks_for_a_password(token_file: Path) -> None:
    embedding = example("socks5_embedding")
    checker = tokens_example.TokenChecker(tokens_example.TokenFile(str(token_file)))
    factory = embedding.make_factory(MemoryReactorClock(), [checker])
    assert factory.methods == [0x02]


def test_services_by_hand_drain_on_stop() -> None:
    embedding = example("socks5_embedding")
    reactor = MemoryReactorClock()
    factory = embedding.make_factory(reactor)
    top = embedding.make_services_by_hand(reactor, ["tcp:1081"], factory)
    top.startService()
    assert reactor.tcpServers[0][0] == 1081
    client = factory.buildProtocol(CLIENT)
    client.makeConnection(StringTransport(hostAddress=SERVER, peerAddress=CLIENT))
    stopped: List[Any] = []
    top.stopService().addBoth(stopped.append)
    assert stopped == []  # a tunnel is open: the stop waits
    late = factory.buildProtocol(CLIENT)  # and nobody new gets in
    late_transport = StringTransport(hostAddress=SERVER, peerAddress=CLIENT)
    late.makeConnection(late_transport)
    assert late.refused and late_transport.disconnected
    reactor.advance(10)  # the drain timeout cuts what is left
    client.connectionLost(Failure(Exception("aborted")))
    assert len(stopped) == 1


@pytest.mark.parametrize(
    ("port", "reply"), [(443, None), (25, ReplyCode.CONNECTION_NOT_ALLOWED)]
)
def test_port_allow_list_connector(port: int, reply: Optional[ReplyCode]) -> None:
    connectors = example("socks5_connectors")
    inner = RecordingConnector()
    connector = connectors.PortAllowListConnector(inner, [80, 443])
    assert verifyObject(IOutboundConnector, connector)
    s = Served([NoAuthAuthenticator()], connector=connector)
    target = Address(AddressType.DOMAIN, "example.test", port)
    s.send(b"\x05\x01\x00" + Request(Command.CONNECT, target).to_bytes())
    if reply is None:
        assert s.take() == b"\x05\x00"  # pending: the inner connector has it
        assert inner.calls == [target]
    else:
        assert s.take() == b"\x05\x00" + Reply(reply).to_bytes()
        assert inner.calls == []
        assert s.closing


def test_proxy_tac_builds_its_application(tmp_path: Path, monkeypatch: Any) -> None:
    from twisted.application.service import IServiceCollection

    example("socks5_embedding")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "users.txt").write_text("alice:secret\n")
    namespace: dict[str, Any] = {"__file__": str(EXAMPLES / "proxy.tac")}
    code = compile((EXAMPLES / "proxy.tac").read_text(), "proxy.tac", "exec")
    exec(code, namespace)  # noqa: S102 - what twistd -y does with a .tac
    (service,) = list(IServiceCollection(namespace["application"]))
    assert isinstance(service, SOCKS5Service)
    assert [a.method for a in service.factory.authenticators] == [0x02]
    assert service.factory.connector.ports == {80, 443}


def test_the_tac_files_users_file_is_explained_where_it_is_shown() -> None:
    """proxy.tac reads users.txt: the page and the file itself say how to make it."""
    command = "printf 'alice:change-me\\n' > users.txt"
    assert command in (DOCS / "embedding.rst").read_text()
    assert command in (EXAMPLES / "proxy.tac").read_text()


def test_authentication_page_runs_the_venvs_python() -> None:
    """The example needs twisted-socks5 installed: the venv's python."""
    text = (DOCS / "authentication.rst").read_text()
    assert "   python3 docs/examples" not in text
    assert ".venv/bin/python docs/examples/socks5_tokens.py" in text


# --------------------------------------------------------------------------
# Tables in the docs that name code and tests


def _ext() -> Any:
    if str(DOCS / "_ext") not in sys.path:
        sys.path.insert(0, str(DOCS / "_ext"))
    return importlib.import_module("socks5_options")


def test_options_page_renders_every_option() -> None:
    lines = _ext().render_options(Options, "twistd socks5")
    rendered = {
        m.group(1)
        for line in lines
        for m in [re.match(r"\.\. option:: (?:-\w(?: <[^>]+>)?, )?--([\w-]+)", line)]
        if m
    }
    expected = {spec.rstrip("=") for spec in Options().longOpt}
    assert rendered == expected
    assert {"listen", "auth", "method", "commands"} <= rendered


def _rst_files() -> List[Path]:
    return sorted(DOCS.rglob("*.rst"))


def test_test_names_in_the_docs_exist() -> None:
    """Every ``tests/...py::test_name`` the pages cite is a real test."""
    cited: List[Tuple[Path, str, str]] = []
    for page in _rst_files():
        for path, name in re.findall(
            r"(tests/[\w/]+\.py)::(\w+)", page.read_text(encoding="utf-8")
        ):
            cited.append((page, path, name))
    assert len(cited) > 20
    missing = [
        f"{page.name}: {path}::{name}"
        for page, path, name in cited
        if not (ROOT / path).exists()
        or not re.search(
            rf"^(async )?def {name}\(", (ROOT / path).read_text(), re.MULTILINE
        )
    ]
    assert missing == []


def _failure_for(raised_as: str) -> Failure:
    from twisted.internet import error

    raised_as = raised_as.replace("``", "")
    if raised_as.startswith("errno "):
        number = getattr(errno, raised_as.split()[1])
        return Failure(error.getConnectError((number, os.strerror(number))))
    dotted = raised_as.split()[-1]
    module, _, name = dotted.rpartition(".")
    return Failure(getattr(importlib.import_module(module), name)())


def test_reply_code_table_matches_reply_for_failure() -> None:
    with open(DOCS / "reply-codes-connect.csv", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) > 10
    for row in rows:
        code = int(row["REP"].strip("`"), 16)
        failure = _failure_for(row["How it reaches the server"])
        assert reply_for_failure(failure) == code, row


API_MODULES = [
    "codec",
    "addresses",
    "interfaces",
    "auth",
    "server",
    "outbound",
    "replies",
    "connect",
    "limits",
    "metrics",
    "htpasswd",
    "bind",
    "udp",
]


@pytest.mark.parametrize("name", API_MODULES)
def test_api_page_documents_the_module_and_its_interfaces(name: str) -> None:
    """
    Sphinx 9's automodule skips zope interfaces, so each page names them with
    ``autointerface``: a new interface must be added to its page.
    """
    page = (DOCS / "api" / f"{name}.rst").read_text(encoding="utf-8")
    module_name = f"twisted_socks5.{name}"
    assert f".. automodule:: {module_name}" in page
    module = importlib.import_module(module_name)
    interfaces = [
        attribute
        for attribute, value in vars(module).items()
        if isinstance(value, InterfaceClass)
        # A package's own, or one of its modules' that it re-exports.
        and (value.__module__ + ".").startswith(module_name + ".")
    ]
    for interface in interfaces:
        assert f".. autointerface:: {module_name}.{interface}" in page


def test_udp_drop_reasons_table_lists_every_reason() -> None:
    from twisted_socks5.udp import DROP_REASONS

    page = (DOCS / "bind-udp.rst").read_text(encoding="utf-8")
    table = page[page.index("Drop reasons") :]
    documented = re.findall(r"^   \* - ``(\w+)``$", table, re.MULTILINE)
    assert sorted(documented) == sorted(DROP_REASONS)


def test_metrics_table_lists_every_metric() -> None:
    pytest.importorskip("prometheus_client")
    page = (DOCS / "deployment.rst").read_text(encoding="utf-8")
    table = page[page.index("   * - metric") : page.index("Nothing is counted")]
    documented = set(re.findall(r"``(socks5_\w+?)(?:_total)?(?:\{[^}]*\})?``", table))
    factory = SOCKS5ServerFactory(reactor=MemoryReactorClock())
    metrics = factory.enable_metrics()
    families = {family.name for family in metrics.registry.collect()}
    assert documented == families


# --------------------------------------------------------------------------
# The pages of the features that landed after the first docs: access rules
# (docs/examples/socks5.rules), the client endpoint (socks5_client.py), and
# the API pages and README that name them.


NEW_API_MODULES = ["rules", "client", "upstream", "workers"]


@pytest.mark.parametrize("name", NEW_API_MODULES)
def test_new_api_pages_document_the_module_and_its_interfaces(name: str) -> None:
    test_api_page_documents_the_module_and_its_interfaces(name)
    index = (DOCS / "api" / "index.rst").read_text(encoding="utf-8")
    assert re.search(rf"^   {name}$", index, re.MULTILINE)


def test_conf_py_lists_every_api_page() -> None:
    """conf.py's API_MODULES (names cross-referenced) and docs/api agree."""
    text = (DOCS / "conf.py").read_text(encoding="utf-8")
    listed = text[
        text.index("API_MODULES = [") : text.index("]", text.index("API_MODULES = ["))
    ]
    modules = set(re.findall(r'"(\w+)"', listed))
    pages = {p.stem for p in (DOCS / "api").glob("*.rst")} - {"index"}
    assert modules == pages


def _ssrf_rules() -> Any:
    from twisted_socks5.rules import RuleSet

    return RuleSet.from_file(EXAMPLES / "socks5.rules")


def _decide(rules: Any, command: Command, host: str, port: int, ip: str) -> bool:
    """
    The whole answer for one request, as the server asks it: as sent, then
    (unless refused already) for the address it would use.
    """
    destination = Address.from_host(host, port)
    if not rules.check_request("198.51.100.1", "alice", command, destination).allowed:
        return False
    return bool(
        rules.check_resolved("198.51.100.1", "alice", command, destination, ip).allowed
    )


def test_ssrf_starter_rules_parse_without_warnings() -> None:
    rules = _ssrf_rules()
    assert rules.warnings == []
    assert rules.default_line is not None and not rules.default_allow


@pytest.mark.parametrize(
    ("host", "ip"),
    [
        ("127.0.0.1", "127.0.0.1"),
        ("::ffff:127.0.0.1", "::ffff:127.0.0.1"),
        ("::1", "::1"),
        ("10.1.2.3", "10.1.2.3"),
        ("169.254.169.254", "169.254.169.254"),
        ("localhost", "127.0.0.1"),
        ("localhost", "::1"),
        ("metadata.google.internal", "169.254.169.254"),
        ("innocent.example", "192.168.1.1"),
        ("innocent.example", "fd00::1"),
        ("innocent.example", "::ffff:10.0.0.1"),
        ("2002:7f00::1", "2002:7f00::1"),
        ("0.0.0.0", "0.0.0.0"),
        ("0x0", "0.0.0.0"),
        ("::", "::"),
        ("::ffff:0.0.0.0", "::ffff:0.0.0.0"),
    ],
)
def test_ssrf_starter_rules_keep_internal_addresses_out(host: str, ip: str) -> None:
    assert not _decide(_ssrf_rules(), Command.CONNECT, host, 443, ip)


def test_ssrf_starter_rules_let_the_web_through_and_nothing_else() -> None:
    rules = _ssrf_rules()
    for port in (80, 443):
        assert _decide(rules, Command.CONNECT, "example.com", port, "93.184.215.14")
        assert _decide(rules, Command.CONNECT, "2001:db8::5", port, "2001:db8::5")
    assert not _decide(rules, Command.CONNECT, "example.com", 22, "93.184.215.14")
    assert not _decide(rules, Command.BIND, "0.0.0.0", 0, "93.184.215.14")
    assert not _decide(rules, Command.UDP_ASSOCIATE, "9.9.9.9", 53, "9.9.9.9")


def test_ssrf_starter_rules_in_the_server() -> None:
    s = Served([NoAuthAuthenticator()], policy=_ssrf_rules())
    s.send(
        b"\x05\x01\x00"
        + Request(Command.CONNECT, Address.from_host("127.0.0.1", 80)).to_bytes()
    )
    assert s.take() == b"\x05\x00" + Reply(ReplyCode.CONNECTION_NOT_ALLOWED).to_bytes()
    assert s.closing
    assert s.protocol.rule is not None and "deny to self" in s.protocol.rule


@pytest.mark.parametrize(
    ("extra", "starts"),
    [
        ("", False),  # anyone could use it for the web: an open proxy
        ("allow from 192.0.2.0/24 command connect port 80, 443\n", True),
    ],
)
def test_ssrf_starter_rules_and_the_open_relay_check(
    tmp_path: Path, extra: str, starts: bool
) -> None:
    """The page says: on a public address, add ``from`` or use --auth."""
    from twisted.python import usage

    text = (EXAMPLES / "socks5.rules").read_text(encoding="utf-8")
    if extra:
        text = text.replace("allow command connect port 80, 443\n", extra)
        assert extra in text
    path = tmp_path / "rules"
    path.write_text(text, encoding="utf-8")
    argv = ["--listen", "tcp:1080:interface=0.0.0.0", "--rules", str(path)]
    if starts:
        Options().parseOptions(argv)
    else:
        with pytest.raises(usage.UsageError, match="open proxy"):
            Options().parseOptions(argv)
        Options().parseOptions([*argv, "--auth", "memory:alice:pw"])


def _literal_block_after(text: str, marker: str) -> List[str]:
    """
    The lines of the first literal block (``::`` or ``.. code-block::``) after
    ``marker``, without their common indentation.
    """
    lines = text[text.index(marker) :].splitlines()
    opener = next(
        i
        for i, line in enumerate(lines)
        if line.rstrip().endswith("::") or line.lstrip().startswith(".. code-block::")
    )
    block: List[str] = []
    for line in lines[opener + 1 :]:
        if line.strip() and not line.startswith(" "):
            break
        block.append(line.rstrip())
    body = [line for line in block if line]
    indent = min(len(line) - len(line.lstrip()) for line in body)
    return [line[indent:] for line in body]


def test_access_rules_page_has_the_grammar_of_the_code() -> None:
    import twisted_socks5.rules

    code = _literal_block_after(twisted_socks5.rules.__doc__ or "", "Grammar (")
    page = (DOCS / "access-rules.rst").read_text(encoding="utf-8")
    documented = _literal_block_after(page, "The grammar (ABNF-like):")
    assert len(code) > 10
    assert documented == code


class _Hello(Resource):
    isLeaf = True

    def render_GET(self, request: Any) -> bytes:
        return b"hello through socks\n"


@pytest_twisted.ensureDeferred
async def test_client_example_fetches_through_our_server() -> None:
    """The treq example against a real server and web site on loopback."""
    from twisted.internet import reactor

    client_example = example("socks5_client")
    web = reactor.listenTCP(0, Site(_Hello()), interface="127.0.0.1")
    proxy = reactor.listenTCP(
        0, SOCKS5ServerFactory(reactor=reactor), interface="127.0.0.1"
    )
    try:
        url = f"http://localhost:{web.getHost().port}/hello"
        fetched = client_example.fetch(
            reactor, url, f"tcp:127.0.0.1:{proxy.getHost().port}"
        )
        body = await defer.ensureDeferred(fetched).addTimeout(30, reactor)
    finally:
        await web.stopListening()
        await proxy.stopListening()
    assert body == b"hello through socks\n"


def test_readme_lists_every_option() -> None:
    """The README's option table names each option of ``twistd socks5 --help``."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    table = readme[readme.index("| option |") : readme.index("twistd's own options")]
    listed = set(re.findall(r"`--([a-z][a-z0-9-]*)", table))
    expected = {spec.rstrip("=") for spec in Options().longOpt}
    assert listed == expected


def test_readme_commands_are_the_documented_ones() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert (
        "python3 -m venv .venv && .venv/bin/pip install . && .venv/bin/twistd -n socks5"
        in readme
    )
    test_command = (
        "python3 -m venv .venv && .venv/bin/pip install tox && .venv/bin/tox p"
    )
    assert test_command + "\n" in readme
    # CI runs that same command (tox in parallel) on a fresh clone.
    assert '"$venv/bin/tox" p\n' in (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert "RFC 1928 in full" not in readme
    assert "GSSAPI" in readme


@pytest.mark.parametrize(
    "path, indent", [(DOCS / "embedding.rst", "   "), (ROOT / "README.md", "")]
)
def test_docs_list_every_factory_argument_with_its_default(
    path: Path, indent: str
) -> None:
    """The signature blocks (embedding.rst, README): each argument, its default."""
    import inspect

    text = path.read_text()
    start = text.index(f"{indent}SOCKS5ServerFactory(\n")
    block = text[start : text.index(f"\n{indent})\n", start)]
    documented = dict(
        re.findall(rf"^{indent}    (\w+)=(.*?),?\s*(?:#.*)?$", block, re.M)
    )
    parameters = inspect.signature(SOCKS5ServerFactory).parameters
    assert set(documented) == set(parameters)
    for name, parameter in parameters.items():
        default = parameter.default
        expected = repr(default)
        if name == "commands":
            expected = "(Command.CONNECT, Command.BIND, Command.UDP_ASSOCIATE)"
        assert documented[name].replace('"', "'") == expected, name
