"""
TLS to the destination, through a SOCKS5 tunnel: the trust root a client
names (a certificate, a PEM file or directory, or the platform's), turned
into what Twisted's TLS needs.  Used by :mod:`twisted_socks5.client` (the
endpoint's ``tls=``) and :mod:`twisted_socks5.agent` (``https`` URLs).

It verifies as ``optionsForClientTLS`` does (the certificate chain and the
host name, or the IP address for a literal); there is no switch to turn
verification off: a client that wants that passes its own connection
creator.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, List, Optional, Union

from twisted.internet.interfaces import IOpenSSLClientConnectionCreator
from twisted.internet.ssl import (
    Certificate,
    optionsForClientTLS,
    trustRootFromCertificates,
)

__all__ = ["TrustRoot", "client_tls", "load_trust_root"]

#: What ``trust_root=`` accepts: a ``Certificate`` or any other
#: ``IOpenSSLTrustRoot`` (``trustRootFromCertificates``...; Twisted checks
#: it), or the path of a PEM file (one certificate or a bundle) or of a
#: directory of ``*.pem`` files.  ``None`` is the platform's trust store.
TrustRoot = Union[Certificate, str, "os.PathLike[str]", Any, None]

_PEM_CERTIFICATE = re.compile(
    rb"-----BEGIN CERTIFICATE-----\r?\n.+?-----END CERTIFICATE-----", re.DOTALL
)


def _certificates_in(path: Path) -> List[Certificate]:
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ValueError(
            f"cannot read trust root {str(path)!r}: {e.strerror}"
        ) from None
    certificates: List[Certificate] = []
    for block in _PEM_CERTIFICATE.finditer(data):
        try:
            certificates.append(Certificate.loadPEM(block.group(0)))
        except Exception as e:
            raise ValueError(f"bad certificate in {str(path)!r}: {e}") from None
    return certificates


def load_trust_root(value: TrustRoot) -> Optional[Any]:
    """
    The trust root ``value`` names, for ``optionsForClientTLS(trustRoot=)``
    and ``BrowserLikePolicyForHTTPS``; ``None`` stays ``None`` (the platform's
    store).  A path is read now, so a wrong one fails where it is given.
    Raises ``ValueError`` for a path without a certificate.
    """
    if not isinstance(value, (str, os.PathLike)):
        return value  # None, or an object Twisted adapts to IOpenSSLTrustRoot
    if not os.fspath(value):
        raise ValueError("the trust root path is empty")
    path = Path(value)
    if path.is_dir():
        certificates = [
            c
            for child in sorted(path.iterdir())
            if child.suffix.lower() == ".pem" and child.is_file()
            for c in _certificates_in(child)
        ]
    else:
        certificates = _certificates_in(path)
    if not certificates:
        raise ValueError(f"no PEM certificate in trust root {str(path)!r}")
    return trustRootFromCertificates(certificates)


def client_tls(
    host: str, trust_root: TrustRoot = None
) -> IOpenSSLClientConnectionCreator:
    """TLS to ``host`` (a name or an IP literal), verified against ``trust_root``."""
    creator: IOpenSSLClientConnectionCreator = optionsForClientTLS(
        host, trustRoot=load_trust_root(trust_root)
    )
    return creator
