"""
Upstream chaining over verified TLS, and TLS on our listening side, with a
CA and certificates made at test time.
"""

from __future__ import annotations

import datetime
import ipaddress
from typing import Any, Tuple

import pytest
import pytest_twisted
from conftest import HashSink, Source, closed_port, listen, until
from test_clients import _download, userpass
from test_errors import connect_request, exchange, failure
from twisted.internet import reactor, threads
from twisted.internet.endpoints import serverFromString

from twisted_socks5.codec import ReplyCode
from twisted_socks5.outbound import UpstreamConnector, parse_upstream
from twisted_socks5.server import SOCKS5ServerFactory
from twisted_socks5.testing import pattern_sha256

x509 = pytest.importorskip("cryptography.x509")
from cryptography.hazmat.primitives import hashes, serialization  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import ec  # noqa: E402
from cryptography.x509.oid import NameOID  # noqa: E402


def _name(common: str) -> Any:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])


def make_pki(tmp_path: Any, server_name: str) -> Tuple[str, str, str]:
    """A CA and a server certificate for ``server_name`` and 127.0.0.1."""
    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (
        x509.CertificateBuilder()
        .subject_name(_name("twisted-socks5 test CA"))
        .issuer_name(_name("twisted-socks5 test CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(server_name))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [
                    x509.DNSName(server_name),
                    x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                ]
            ),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    ca_path = tmp_path / "ca.pem"
    ca_path.write_bytes(ca.public_bytes(pem))
    cert_path = tmp_path / "server.pem"
    cert_path.write_bytes(cert.public_bytes(pem))
    key_path = tmp_path / "server.key"
    key_path.write_bytes(
        key.private_bytes(
            pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return str(ca_path), str(cert_path), str(key_path)


@pytest.fixture
def tls_upstream(tmp_path: Any) -> Any:
    """Our server with a password, listening with TLS (an ssl: endpoint)."""
    ca, cert, key = make_pki(tmp_path, "upstream.test")
    factory = SOCKS5ServerFactory([userpass(alice="s3cret")], reactor=reactor)
    endpoint = serverFromString(
        reactor, f"ssl:0:interface=127.0.0.1:privateKey={key}:certKey={cert}"
    )
    port = pytest_twisted.blockon(endpoint.listen(factory))
    yield factory, port.getHost().port, ca
    pytest_twisted.blockon(port.stopListening())


def front(upstream_url: str) -> Tuple[SOCKS5ServerFactory, Any]:
    proxy, user, password = parse_upstream(reactor, upstream_url)
    connector = UpstreamConnector(reactor, proxy, user, password, timeout=10)
    factory = SOCKS5ServerFactory(reactor=reactor, connector=connector)
    return factory, listen(factory)


@pytest_twisted.ensureDeferred
async def test_chain_through_a_verified_tls_upstream(
    tls_upstream: Any, tcp_target: Any
) -> None:
    upstream, up_port, ca = tls_upstream
    url = f"socks5+tls://alice:s3cret@127.0.0.1:{up_port}?ca={ca}&servername=upstream.test"
    factory, port = front(url)
    source = tcp_target(Source)
    try:
        payload = 4 << 20
        digest = await threads.deferToThread(
            _download, f"socks5://127.0.0.1:{port.getHost().port}", source, payload
        )
        assert digest == pattern_sha256(payload)
    finally:
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_wrong_upstream_name_fails_the_connection(
    tls_upstream: Any, tcp_target: Any
) -> None:
    _, up_port, ca = tls_upstream
    url = f"socks5+tls://alice:s3cret@127.0.0.1:{up_port}?ca={ca}&servername=evil.test"
    factory, port = front(url)
    try:
        request = b"\x05\x01\x00" + connect_request("127.0.0.1", tcp_target(HashSink))
        out = await exchange(port.getHost().port, request)
        assert out == b"\x05\x00" + failure(ReplyCode.GENERAL_FAILURE)
    finally:
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_upstream_reply_codes_pass_through(tls_upstream: Any) -> None:
    _, up_port, ca = tls_upstream
    url = f"socks5+tls://alice:s3cret@127.0.0.1:{up_port}?ca={ca}&servername=upstream.test"
    factory, port = front(url)
    try:
        request = b"\x05\x01\x00" + connect_request("127.0.0.1", closed_port())
        out = await exchange(port.getHost().port, request)
        assert out == b"\x05\x00" + failure(ReplyCode.CONNECTION_REFUSED)
    finally:
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_wrong_upstream_password(tls_upstream: Any, tcp_target: Any) -> None:
    _, up_port, ca = tls_upstream
    url = (
        f"socks5+tls://alice:nope@127.0.0.1:{up_port}?ca={ca}&servername=upstream.test"
    )
    factory, port = front(url)
    try:
        request = b"\x05\x01\x00" + connect_request("127.0.0.1", tcp_target(HashSink))
        out = await exchange(port.getHost().port, request)
        assert out == b"\x05\x00" + failure(ReplyCode.GENERAL_FAILURE)
    finally:
        await port.stopListening()


@pytest.mark.parametrize(
    "spec",
    ["http://x:1", "socks5://:1080", "socks5://alice@host:1080", "nosuch:endpoint"],
)
def test_bad_upstream_specs(spec: str) -> None:
    with pytest.raises((ValueError, TypeError, KeyError)):
        parse_upstream(reactor, spec)


@pytest_twisted.ensureDeferred
async def test_unreachable_upstream_is_not_a_refused_destination(
    tcp_target: Any,
) -> None:
    factory, port = front(f"socks5://127.0.0.1:{closed_port()}")
    try:
        request = b"\x05\x01\x00" + connect_request("127.0.0.1", tcp_target(HashSink))
        out = await exchange(port.getHost().port, request)
        assert out == b"\x05\x00" + failure(ReplyCode.GENERAL_FAILURE)
    finally:
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_rules_route_requests_through_named_upstreams(
    tcp_target: Any, resolver: Any
) -> None:
    """'via up' sends what a rule allows through the upstream; others go direct."""
    from conftest import Echo, LoopbackResolver

    from twisted_socks5.outbound import DirectConnector
    from twisted_socks5.rules import RuleSet

    upstream = SOCKS5ServerFactory(reactor=reactor)
    up_port = listen(upstream)
    proxy, user, password = parse_upstream(
        reactor, f"socks5://127.0.0.1:{up_port.getHost().port}"
    )
    rules = RuleSet.parse("allow to 127.0.0.2/32, .routed.test via up\ndefault allow\n")
    local = DirectConnector(reactor, 10, resolver=LoopbackResolver(v6=False))
    factory = SOCKS5ServerFactory(
        reactor=reactor,
        policy=rules,
        connector=local,
        routes={"up": UpstreamConnector(reactor, proxy, timeout=10, local=local)},
    )
    port = listen(factory)
    target = tcp_target(Echo, "127.0.0.1")
    seen: list[str] = []
    original = upstream.connection_closed

    def record(protocol: Any, reason: Any) -> None:
        seen.append(str(protocol.request.address) if protocol.request else "-")
        original(protocol, reason)

    upstream.connection_closed = record  # type: ignore[method-assign]
    try:
        from test_errors import RawClient
        from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol

        from twisted_socks5.codec import AddressType

        async def tunnel(host: str, atyp: AddressType) -> bytes:
            client = RawClient(
                b"\x05\x01\x00" + connect_request(host, target, atyp) + b"hi"
            )
            await connectProtocol(
                TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port), client
            )
            await until(lambda: b"".join(client.received).endswith(b"hi"), "echo")
            client.transport.loseConnection()
            await client.done
            await until(lambda: not (factory.active or upstream.active), "closed")
            return b"".join(client.received)

        # 127.0.0.1 is allowed by "default allow": direct, the upstream sees nothing.
        assert (await tunnel("127.0.0.1", AddressType.IPV4))[:2] == b"\x05\x00"
        assert seen == []
        # A name matching ".routed.test" goes through the upstream, by IP.
        assert (await tunnel("x.routed.test", AddressType.DOMAIN))[:2] == b"\x05\x00"
        assert seen == [f"127.0.0.1:{target}"]
    finally:
        await port.stopListening()
        await up_port.stopListening()
