"""Bearer-token authentication and scopes for ``/api/v1``.

``@requires(scope)`` authenticates the caller, checks the scope (admin ⊇ write ⊇ read)
and leaves the principal on ``flask.g``. ``check_api_protected`` runs at startup and
refuses an app with an ``/api/v1`` view that forgot the decorator. The token itself is
never logged or stored; only its HMAC is looked up. A valid token's principal is
remembered in process memory for ``cache_local_ttl_s`` (``shared.cache``, class
``tokens``); ``conveyor token revoke`` invalidates it in every process before it answers.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import ParamSpec, TypeVar

from flask import Flask, g, request

from shared.cache import TOKENS
from shared.models import TokenScope
from shared.tokens import Principal, authenticate, hash_token
from web.errors import Forbidden, Unauthorized
from web.extension import conveyor, db_session

API_PREFIX = "/api/v1"

P = ParamSpec("P")
R = TypeVar("R")

# The wrapped views, so the startup check can tell a protected endpoint from a forgotten one.
_PROTECTED: set[Callable[..., object]] = set()


def current_principal() -> Principal:
    """The authenticated caller of this request."""
    principal: Principal = g.principal
    return principal


def required_scope() -> TokenScope:
    """The scope this request's view demanded."""
    scope: TokenScope = g.required_scope
    return scope


def visible_owner(principal: Principal) -> str | None:
    """The owner whose jobs ``principal`` may see; None means everyone's (admin)."""
    return None if principal.allows(TokenScope.ADMIN) else principal.token_id


def _authenticate_request() -> Principal:
    header = request.headers.get("Authorization")
    if not header:
        raise Unauthorized("this endpoint needs an 'Authorization: Bearer <token>' header")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer":
        # RFC 6750 §3.1: no Bearer credentials presented, so no error code in the challenge.
        raise Unauthorized("the Authorization header must use the Bearer scheme")
    ext = conveyor()
    plain = token.strip()
    # Remembered per process for a moment (shared.cache, class "tokens"): a revoke bumps
    # the class's generation, so no process accepts a revoked token after it answers.
    principal: Principal | None = ext.cache.remember(
        TOKENS, hash_token(ext.token_pepper, plain), lambda: _lookup(ext.token_pepper, plain)
    )
    if principal is None:
        raise Unauthorized("the bearer token is unknown or revoked", invalid_token=True)
    return principal


def _lookup(pepper: str, plain: str) -> Principal | None:
    session = db_session()
    principal = authenticate(session, pepper, plain)
    # End the lookup's transaction now rather than holding it idle through the view.
    session.rollback()
    return principal


def requires(scope: TokenScope) -> Callable[[Callable[P, R]], Callable[P, R]]:
    """Decorate a view: authenticate the bearer token and demand ``scope``."""

    def decorate(view: Callable[P, R]) -> Callable[P, R]:
        @functools.wraps(view)
        def guarded(*args: P.args, **kwargs: P.kwargs) -> R:
            principal = _authenticate_request()
            if not principal.allows(scope):
                raise Forbidden(f"this endpoint needs a token with the {scope.value!r} scope")
            g.principal = principal
            g.required_scope = scope
            return view(*args, **kwargs)

        _PROTECTED.add(guarded)
        return guarded

    return decorate


def check_api_protected(app: Flask) -> None:
    """Refuse to start if any ``/api/v1`` endpoint lacks ``@requires``."""
    unprotected = sorted(
        rule.rule
        for rule in app.url_map.iter_rules()
        if rule.rule.startswith(API_PREFIX) and app.view_functions[rule.endpoint] not in _PROTECTED
    )
    if unprotected:
        raise RuntimeError(f"API endpoints without @requires: {', '.join(unprotected)}")
