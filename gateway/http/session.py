"""Dashboard sessions: a signed cookie naming a monitor key, and the CSRF token bound to it.

A browser cannot send a bearer header, so the login form trades a monitor token for a cookie. The cookie
carries the key id, a tag of the key's token (a digest of its sha256, never the token), an expiry and a
random nonce, signed with HMAC-SHA256 under DASHBOARD_SECRET (or a random per-process secret). A session
is valid while its signature checks, it has not expired, its key still exists with the monitor scope and
the same token (so revoking the key, rotating its token or recreating it under the same id, then reloading
the keys file, ends its sessions at once), and it was not logged out: logout stores the nonce in Redis
until the cookie would have expired (the only server-side state).

The CSRF token is HMAC(secret, "csrf:" + nonce): every state-changing request made with the cookie must
echo it (form field `csrf_token` or header `X-CSRF-Token`). The cookie is also SameSite=Strict, so other
sites cannot make the browser send it at all; the token is the second, independent line of defence.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import time
from dataclasses import dataclass
from urllib.parse import urlencode

import orjson
from aiohttp import web
from redis.asyncio import Redis

from gateway.errors import ApiError
from gateway.http.appkeys import KEYRING, REDIS, REDIS_KEYS
from gateway.keys import ApiKey, Scope
from gateway.redis_keys import RedisKeys

COOKIE_NAME = "llm_gateway_session"
LOGIN_PATH = "/dashboard/login"
CSRF_FIELD = "csrf_token"
CSRF_HEADER = "X-CSRF-Token"

SECRET = web.AppKey("dashboard_secret", bytes)


@dataclass(frozen=True, slots=True)
class Session:
    """A verified dashboard session."""

    key_id: str
    expires: int
    nonce: str
    csrf: str
    tag: str = ""


SESSION = web.RequestKey("dashboard_session", Session)
"""Set by the auth middleware when the request was authenticated by the session cookie."""


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _sign(secret: bytes, message: bytes) -> str:
    return _b64(hmac.new(secret, message, hashlib.sha256).digest())


def csrf_for(secret: bytes, nonce: str) -> str:
    """The CSRF token of the session with this nonce."""
    return _sign(secret, b"csrf:" + nonce.encode())


def make_cookie_value(secret: bytes, key_id: str, lifetime: float, now: float | None = None, *,
                      tag: str = "") -> tuple[str, Session]:
    """A new signed cookie value for `key_id` (whose token has session tag `tag`), and its session."""
    expires = int((time.time() if now is None else now) + lifetime)
    nonce = secrets.token_urlsafe(16)
    payload = _b64(orjson.dumps({"k": key_id, "e": expires, "n": nonce, "t": tag}))
    value = f"{payload}.{_sign(secret, payload.encode())}"
    return value, Session(key_id, expires, nonce, csrf_for(secret, nonce), tag)


def verify_cookie_value(secret: bytes, value: str, now: float | None = None) -> Session | None:
    """The session a cookie value stands for, or None when it is forged, malformed or expired."""
    payload, dot, signature = value.partition(".")
    if not dot or not hmac.compare_digest(signature.encode(), _sign(secret, payload.encode()).encode()):
        return None
    try:
        data = orjson.loads(_unb64(payload))
        key_id, expires, nonce, tag = data["k"], data["e"], data["n"], data.get("t", "")
    except (ValueError, KeyError, TypeError, AttributeError):
        return None
    if not (isinstance(key_id, str) and isinstance(expires, int) and isinstance(nonce, str)
            and isinstance(tag, str)):
        return None
    if expires <= (time.time() if now is None else now):
        return None
    return Session(key_id, expires, nonce, csrf_for(secret, nonce), tag)


class SessionRevocations:
    """The one piece of server-side session state: nonces of logged-out sessions, each kept (a Redis string
    with a TTL) only until its cookie would have expired anyway."""

    def __init__(self, redis: Redis, keys: RedisKeys) -> None:
        self.redis = redis
        self.keys = keys

    async def revoke(self, session: Session, now: float | None = None) -> None:
        """End `session` server-side, whatever the browser does with its cookie."""
        ttl = max(1, int(session.expires - (time.time() if now is None else now)) + 1)
        await self.redis.set(self.keys.dashboard_session_revoked(session.nonce), b"1", ex=ttl)

    async def revoked(self, session: Session) -> bool:
        """True when `session` was logged out."""
        return bool(await self.redis.exists(self.keys.dashboard_session_revoked(session.nonce)))


def revocations(app: web.Application) -> SessionRevocations:
    """The revocation store on the app's Redis (a thin view: nothing to start or stop)."""
    return SessionRevocations(app[REDIS], app[REDIS_KEYS])


async def session_key(request: web.Request) -> ApiKey | None:
    """The monitor key a valid session cookie names (recording the session on the request), else None."""
    secret = request.app.get(SECRET)
    value = request.cookies.get(COOKIE_NAME)
    if secret is None or not value:
        return None
    session = verify_cookie_value(secret, value)
    if session is None:
        return None
    keyring = request.app[KEYRING]
    key = keyring.by_id(session.key_id)
    if key is None or not key.allows(Scope.MONITOR):
        return None
    tag = keyring.session_tag(key.id) or ""
    if not tag or not hmac.compare_digest(tag.encode(), session.tag.encode()):
        return None  # made with another token than the key's current one
    if await revocations(request.app).revoked(session):
        return None
    request[SESSION] = session
    return key


def login_redirect(request: web.Request) -> web.Response | None:
    """A redirect to the login form for a browser asking for a dashboard page; None for anything else.

    Only page handlers marked with `login_page` redirect, and only for clients that ask for HTML
    (browsers): scripts keep getting the 401 JSON with its WWW-Authenticate challenge.
    """
    if not getattr(request.match_info.handler, "login_page", False) or request.method != "GET":
        return None
    if "text/html" not in request.headers.get("Accept", ""):
        return None
    location = f"{LOGIN_PATH}?{urlencode({'next': request.path_qs})}"
    return web.Response(status=302, headers={"Location": location, "Cache-Control": "no-store"})


_SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
_FORM_TYPES = frozenset({"application/x-www-form-urlencoded", "multipart/form-data"})


async def require_csrf(request: web.Request) -> None:
    """Refuse (403) any cookie-authenticated request that changes something without the CSRF token.

    The auth middleware calls this for every request the session cookie authenticated, so every monitor
    route that changes state (this module's forms, other route families' POSTs) is covered without each
    handler remembering to check. The token comes from the X-CSRF-Token header or the form field.
    """
    if request.method in _SAFE_METHODS or request.get(SESSION) is None:
        return
    given: str | None = request.headers.get(CSRF_HEADER)
    if not given and request.content_type in _FORM_TYPES:
        given = str((await request.post()).get(CSRF_FIELD, ""))
    check_csrf(request, given or "")


def check_csrf(request: web.Request, form_value: str | None = None) -> None:
    """Refuse (403) a cookie-authenticated change whose CSRF token is missing or wrong.

    Bearer-authenticated requests need no token: a browser never attaches a bearer header by itself.
    """
    session = request.get(SESSION)
    if session is None:
        return
    given = form_value if form_value is not None else request.headers.get(CSRF_HEADER, "")
    if not given or not hmac.compare_digest(given.encode(), session.csrf.encode()):
        raise ApiError(403, "The CSRF token is missing or wrong: reload the dashboard page and try again "
                       f"(scripts using the session cookie send it as {CSRF_HEADER}).", type="permission_error",
                       code="csrf_failed")
