"""API tokens: created once, stored as HMAC-SHA256(pepper, token), listed and revoked."""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import secrets
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from shared.models import ApiToken, TokenScope

TOKEN_PREFIX = "cvr_"  # noqa: S105 - a public marker, not a secret
# Scopes are ordered: admin ⊇ write ⊇ read.
SCOPE_RANK = {TokenScope.READ: 0, TokenScope.WRITE: 1, TokenScope.ADMIN: 2}


def hash_token(pepper: str, token: str) -> str:
    """The stored form of a token; the pepper lives in settings, never in the database."""
    return hmac.new(pepper.encode(), token.encode(), hashlib.sha256).hexdigest()


@dataclass(frozen=True)
class Principal:
    """Who is calling: the token's id (the jobs' owner), name and scope."""

    token_id: str
    name: str
    scope: TokenScope

    def allows(self, needed: TokenScope) -> bool:
        return SCOPE_RANK[self.scope] >= SCOPE_RANK[needed]


def create_token(
    session: Session, pepper: str, name: str, scope: TokenScope
) -> tuple[ApiToken, str]:
    """Create a token; returns the row and the plain token, which is never stored."""
    plain = TOKEN_PREFIX + secrets.token_urlsafe(32)
    row = ApiToken(
        id=uuid.uuid4(),
        name=name,
        scope=scope.value,
        token_hash=hash_token(pepper, plain),
        prefix=plain[:10],
    )
    session.add(row)
    session.commit()
    return row, plain


def authenticate(session: Session, pepper: str, plain: str) -> Principal | None:
    """The principal for a presented token, or None if unknown or revoked."""
    if not plain.startswith(TOKEN_PREFIX) or len(plain) > 200:
        return None
    row = session.scalar(
        select(ApiToken).where(
            ApiToken.token_hash == hash_token(pepper, plain), ApiToken.revoked_at.is_(None)
        )
    )
    if row is None:
        return None
    return Principal(token_id=str(row.id), name=row.name, scope=TokenScope(row.scope))


def list_tokens(session: Session) -> list[ApiToken]:
    return list(session.scalars(select(ApiToken).order_by(ApiToken.created_at)))


def revoke_token(session: Session, token_id_or_prefix: str) -> int:
    """Revoke by id or by the printed prefix; returns how many tokens were revoked."""
    condition = ApiToken.prefix == token_id_or_prefix
    with contextlib.suppress(ValueError):
        condition = ApiToken.id == uuid.UUID(token_id_or_prefix)
    result = session.execute(
        update(ApiToken)
        .where(condition, ApiToken.revoked_at.is_(None))
        .values(revoked_at=datetime.now(UTC))
    )
    session.commit()
    return int(result.rowcount)  # type: ignore[attr-defined]
