"""
The drop-in that makes ``twistd socks5`` find the token method and checker.

twistd imports every module in every ``twisted/plugins/`` directory on
``sys.path`` (one without ``__init__.py``), so keep this file to the two
objects: the implementation lives in ``socks5_tokens``.
"""

from socks5_tokens import TokenAuthenticatorFactory, TokenCheckerFactory

#: ``--method token:FILE``
token = TokenAuthenticatorFactory()
#: ``--auth tokens:FILE``
tokens = TokenCheckerFactory()
