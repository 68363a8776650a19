"""Sphinx configuration for twisted-socks5."""

from __future__ import annotations

import importlib
import os
import re
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
# Document the working tree, whatever is installed; find the local extension.
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, os.path.join(HERE, "_ext"))

from twisted_socks5 import __version__  # noqa: E402

project = "twisted-socks5"
author = "the twisted-socks5 authors"
copyright = "the twisted-socks5 authors"
release = __version__
version = ".".join(__version__.split(".")[:2])

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.viewcode",
    "repoze.sphinx.autointerface",
    "socks5_options",
]

root_doc = "index"
exclude_patterns = ["_build"]
templates_path: list[str] = []
html_static_path = ["_static"]
html_css_files = ["tables.css"]

try:
    import furo  # noqa: F401
except ImportError:  # pragma: no cover - the docs extra installs it
    html_theme = "alabaster"
else:
    html_theme = "furo"
html_title = f"twisted-socks5 {release}"

# -- autodoc ---------------------------------------------------------------

#: The modules of the API reference (docs/api/*.rst).
API_MODULES = [
    "codec",
    "socks4",
    "addresses",
    "handshake",
    "interfaces",
    "auth",
    "server",
    "connection",
    "admission",
    "reloading",
    "outbound",
    "outgoing",
    "resolver",
    "replies",
    "connect",
    "limits",
    "metrics",
    "htpasswd",
    "bind",
    "udp",
    "rules",
    "selfnet",
    "client",
    "agent",
    "clienttls",
    "upstream",
    "workers",
    "options",
    "exposure",
    "tap",
    "logs",
    "testing",
    "commands",
    "tunnel",
    "relay",
    "httpproxy",
    "limitstore",
    "limiting",
    "redisstore",
    "resp",
    "accesslog",
    "revocation",
    "admin",
]
#: Modules in progress, not in the API reference yet: their names are not
#: cross-referenced.  Move a module to API_MODULES once docs/api has its page.
IN_PROGRESS_MODULES: list[str] = []

autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autoclass_content = "both"
# Twisted's own docstrings (epytext) would otherwise fill every callback.
autodoc_inherit_docstrings = False
# Show defaults as written (Failure(ConnectionDone())), not their repr.
autodoc_preserve_defaults = True
autodoc_default_options = {
    "members": True,
    "undoc-members": True,
    "show-inheritance": False,
    # Loggers are not API.
    "exclude-members": "log",
}


def _modules(names):
    for name in names:
        try:
            yield importlib.import_module(f"twisted_socks5.{name}")
        except Exception:  # noqa: BLE001, S112 - a module in progress may not import
            continue


def _name_interfaces():
    """
    Annotations name zope interfaces (``Optional[IOutboundConnector]``), which
    are objects, not classes, and have no ``__qualname__``: autodoc would print
    their repr.  Give those the modules use one (in this process only).
    """
    from zope.interface.interface import InterfaceClass

    for module in _modules([*API_MODULES, *IN_PROGRESS_MODULES]):
        for value in vars(module).values():
            if isinstance(value, InterfaceClass) and not getattr(
                value, "__qualname__", None
            ):
                value.__qualname__ = value.__name__


_name_interfaces()

# -- cross-references ------------------------------------------------------

nitpicky = True
nitpick_ignore_regex = [
    # Twisted, zope.interface and third parties have no inventory here (the
    # build runs offline, so no intersphinx): their names stay plain text.
    (r"py:.*", r"(twisted|zope|prometheus_client|bcrypt)(\..*)?"),
    # Names used in signatures that resolve to nothing we document.
    (r"py:.*", r"(typing|collections|enum|dataclasses|types)\..*"),
    (r"py:class", r"(Any|Optional|Union|Callable|Collection|Sequence|Deque)"),
    (r"py:class", r"(T|_T|Buffer|Parsed|Sendable)"),
    (r"py:class", r"(Deferred|Failure|IAddress|IProtocol|IProtocolFactory)"),
    (r"py:class", r"(IHostnameResolver|Portal|ICredentialsChecker|Factory)"),
    (r"py:class", r"(Protocol|DatagramProtocol|Interface|Attribute)"),
    (r"py:class", r"(HostnameEndpoint|IUsernamePassword|ITransport|IRealm)"),
    (r"py:class", r"(IStreamClientEndpoint|IReactorTime|IAgent|IPolicyForHTTPS)"),
    (r"py:class", r"(IOpenSSLClientConnectionCreator|HTTPConnectionPool|URI)"),
    (r"py:class", r"(Certificate|PathLike)"),
    (r"py:.*", r"(ipaddress|resource|os|socket|contextvars)\..*"),
    # Private helpers named in the signatures of public methods.
    (r"py:.*", r".*\._[A-Za-z]\w*"),
    # Modules in progress (and internals) without an API page: the zero-copy
    # relay and the worker process's entry point.
    (r"py:.*", r"twisted_socks5\.(splice|worker|workerprocess)(\..*)?"),
]
# ...and the names they define, used bare in the documented modules' annotations.
nitpick_ignore_regex += [
    (r"py:.*", re.escape(name))
    for module in _modules(IN_PROGRESS_MODULES)
    for name, value in sorted(vars(module).items())
    if not name.startswith("_")
    and getattr(value, "__module__", None) == module.__name__
]

_INTERFACE_REPR = re.compile(r"<InterfaceClass ([\w.]+)>")


def _interface_names(app, what, name, obj, options, signature, annotation):
    """Show ``IFoo`` in signatures, not ``<InterfaceClass pkg.IFoo>``."""
    if signature:
        signature = _INTERFACE_REPR.sub(r"\1", signature)
    if annotation:
        annotation = _INTERFACE_REPR.sub(r"\1", annotation)
    return signature, annotation


def _unqualified(app, env, node, contnode):
    """
    Resolve a bare name (``:class:`IAuthenticatorFactory``` in a module that
    only imports it) to the one object of that name in the package, and a
    name in a subpackage's module to where the subpackage documents it.
    """
    from sphinx.util.nodes import make_refnode

    target = node.get("reftarget", "")
    if node.get("refdomain") != "py":
        return None
    objects = env.get_domain("py").objects
    if target.startswith("twisted_socks5.") and target.count(".") > 2:
        # A name as its defining module spells it (``rules.decision.IPolicy``)
        # where the package documents it (``rules.IPolicy``).
        package, _, name = target.rpartition(".")
        public = f"{package.rpartition('.')[0]}.{name}"
        if public in objects:
            entry = objects[public]
            return make_refnode(
                app.builder, node["refdoc"], entry.docname, entry.node_id, contnode
            )
        return None
    if "." in target:
        return None
    found = [
        name
        for name in objects
        if name.startswith("twisted_socks5.")
        and name.rsplit(".", 1)[1] == target
        and not objects[name].aliased  # the same object by its defining module
    ]
    if len(found) != 1:
        return None
    entry = objects[found[0]]
    return make_refnode(
        app.builder, node["refdoc"], entry.docname, entry.node_id, contnode, found[0]
    )


def setup(app):
    app.connect("autodoc-process-signature", _interface_names)
    app.connect("missing-reference", _unqualified)
