"""The version, and the line that names it with Twisted's (--version, logs)."""

__version__ = "0.1.0.dev0"


def version_line() -> str:
    """twisted-socks5's version, and Twisted's."""
    import twisted

    return f"twisted-socks5 {__version__} (Twisted {twisted.__version__})"
