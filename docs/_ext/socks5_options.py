"""
A Sphinx directive that documents a ``twisted.python.usage.Options`` class
from the class itself, so the option reference never drifts from the code::

    .. usage-options:: twisted_socks5.options.Options
       :program: twistd socks5
       :auth-types:

Each option becomes a ``.. option::`` entry (so ``:option:`` links work): its
help text (the ``optParameters``/``optFlags`` text or the ``opt_*``
docstring), its default and what values it takes (the coerce function's
``coerceDoc``).  ``:auth-types:`` adds the ``--auth`` checker types that
Twisted and twisted-socks5 provide.

The functions that read an Options class (:func:`describe_options`,
:func:`render_options`) import nothing from Sphinx, so tests can call them.
"""

from __future__ import annotations

import importlib
import inspect
import re
import sys
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

#: Characters that could start reST markup in help text written as plain text.
_MARKUP = re.compile(r"([\\*`_|])")
_OPTION_IN_TEXT = re.compile(r"(?<![\w-])--([a-z][a-z0-9-]*[a-z0-9])")


@dataclass(frozen=True)
class OptionDoc:
    """One command-line option, as ``--help`` knows it."""

    name: str
    short: Optional[str]
    takes_value: bool
    metavar: str
    doc: str
    default: Any
    values: str


def _clean(text: Optional[str]) -> str:
    """Help text as one line: docstrings keep their indentation otherwise."""
    return " ".join((text or "").split())


def _metavar(name: str, options: Any) -> str:
    """A placeholder for the option's value, from its coercer or handler."""
    dispatch = options._dispatch.get(name)
    coerce_doc = _clean(getattr(dispatch, "doc", "")).lower()
    if "second" in coerce_doc:
        return "SECONDS"
    if "number" in coerce_doc:
        return "N"
    handler = getattr(options, "opt_" + name.replace("-", "_"), None)
    if handler is not None:
        parameters = list(inspect.signature(handler).parameters)
        if parameters:
            return re.sub(r"(?<!^)(?=[A-Z])", "_", parameters[0]).upper()
    return "VALUE"


def describe_options(
    options_class: type, metavars: Optional[Dict[str, str]] = None
) -> List[OptionDoc]:
    """
    Every option of ``options_class``, sorted by name as ``--help`` sorts.

    :param metavars: placeholders for option values, by option name, where
        the guess from the coerce function or handler argument is poor.
    """
    metavars = metavars or {}
    options = options_class()
    short_for: Dict[str, str] = {
        long: short
        for short, long in options.synonyms.items()
        if len(short) == 1 and short != long
    }
    found = []
    for spec in options.longOpt:
        takes_value = spec.endswith("=")
        name = spec.rstrip("=")
        dispatch = options._dispatch.get(name)
        found.append(
            OptionDoc(
                name=name,
                short=short_for.get(name),
                takes_value=takes_value,
                metavar=(metavars.get(name) or _metavar(name, options))
                if takes_value
                else "",
                doc=_clean(options.docs.get(name)),
                default=options.defaults.get(name),
                values=_clean(getattr(dispatch, "doc", "")),
            )
        )
    return sorted(found, key=lambda o: o.name)


def _escape(text: str) -> str:
    return _MARKUP.sub(r"\\\1", text)


def _link_options(text: str, known: set[str]) -> str:
    """Turn ``--name`` in escaped help text into links to that option."""

    def link(match: re.Match[str]) -> str:
        raw = match.group(1)
        name = raw.replace("\\", "")
        if name in known:
            return f":option:`--{name}`"
        return match.group(0)

    return _OPTION_IN_TEXT.sub(link, text)


def render_options(
    options_class: type,
    program: str,
    metavars: Optional[Dict[str, str]] = None,
    longdesc: bool = False,
) -> List[str]:
    """The reST for every option of ``options_class``."""
    described = describe_options(options_class, metavars)
    known = {o.name for o in described}
    lines = [f".. program:: {program}", ""]
    description = _clean(getattr(options_class, "longdesc", ""))
    if longdesc and description:
        lines += [_link_options(_escape(description), known), ""]
    for option in described:
        signature = f"--{option.name}"
        if option.takes_value:
            signature += f" <{option.metavar}>"
        if option.short:
            short = f"-{option.short}"
            if option.takes_value:
                short += f" <{option.metavar}>"
            signature = f"{short}, {signature}"
        lines.append(f".. option:: {signature}")
        lines.append("")
        text = _link_options(_escape(option.doc), known) or "(undocumented)"
        lines.append(f"   {text}")
        lines.append("")
        if option.values:
            lines.append(f"   *Value:* {_link_options(_escape(option.values), known)}")
            lines.append("")
        if option.takes_value and option.default is not None:
            lines.append(f"   *Default:* ``{option.default}``")
            lines.append("")
    return lines


def _bundled(factory: Any) -> bool:
    """Checker factories from Twisted and this project, not from the build host."""
    module = type(factory).__module__
    return module.split(".")[0] in ("twisted", "twisted_socks5")


def render_auth_types(options_class: type) -> List[str]:
    """A table of the ``--auth`` types this program accepts."""
    from twisted.cred.strcred import findCheckerFactories

    options = options_class()
    rows = sorted(
        (
            factory
            for factory in findCheckerFactories()
            if _bundled(factory) and options.supportsCheckerFactory(factory)
        ),
        key=lambda f: f.authType,
    )
    lines = [
        ".. list-table:: ``--auth`` types that come with Twisted and twisted-socks5",
        "   :header-rows: 1",
        "   :widths: 15 25 60",
        "",
        "   * - type",
        "     - argument",
        "     - what it checks",
    ]
    for factory in rows:
        lines += [
            f"   * - ``{factory.authType}``",
            f"     - {_escape(_clean(factory.argStringFormat)) or '(none)'}",
            f"     - {_escape(_clean(factory.authHelp))}",
        ]
    return [*lines, ""]


def _import(dotted: str) -> Any:
    module_name, _, attribute = dotted.rpartition(".")
    return getattr(importlib.import_module(module_name), attribute)


def setup(app: Any) -> Dict[str, Any]:
    from docutils.parsers.rst import directives
    from docutils.statemachine import StringList
    from sphinx.util.docutils import SphinxDirective
    from sphinx.util.nodes import nested_parse_with_titles

    class UsageOptions(SphinxDirective):
        required_arguments = 1
        has_content = False
        option_spec = {
            "program": directives.unchanged_required,
            "auth-types": directives.flag,
            "longdesc": directives.flag,
            "metavars": directives.unchanged,
        }

        def run(self) -> List[Any]:
            options_class = _import(self.arguments[0])
            module = sys.modules[options_class.__module__]
            if getattr(module, "__file__", None):
                self.env.note_dependency(module.__file__)
            program = self.options.get("program", self.arguments[0])
            metavars = dict(
                item.split("=", 1) for item in self.options.get("metavars", "").split()
            )
            lines = render_options(
                options_class, program, metavars, "longdesc" in self.options
            )
            if "auth-types" in self.options:
                lines += render_auth_types(options_class)
            from docutils import nodes

            container = nodes.container()
            source = self.get_source_info()[0] or "<usage-options>"
            nested_parse_with_titles(
                self.state,
                StringList(lines, source=source),
                container,
            )
            return list(container.children)

    app.add_directive("usage-options", UsageOptions)
    return {"version": "1", "parallel_read_safe": True, "parallel_write_safe": True}
