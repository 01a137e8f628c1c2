"""The operator dashboard under /dashboard: login/logout, the pages, and their static files.

Pages are Jinja2 templates from the repository's top-level templates/ directory (found relative to this
package, so it works from a source checkout and an editable install). Each page embeds its monitor JSON
(gateway/http/monitor.py) for the first paint, and gateway/static/dashboard.js polls the same endpoint every
two seconds to update the page in place. Sessions and CSRF are in gateway/http/session.py.
"""

from __future__ import annotations

import hashlib
import inspect
import secrets
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import aiohttp_jinja2
import jinja2
import orjson
import structlog
from aiohttp import web
from markupsafe import Markup

from gateway.batch.jobs import JobStatus
from gateway.errors import ApiError
from gateway.http import monitor
from gateway.http.appkeys import API_KEY, KEYRING, SETTINGS
from gateway.http.auth import public, requires_scope
from gateway.http.session import COOKIE_NAME, CSRF_FIELD, LOGIN_PATH, SECRET, SESSION, make_cookie_value
from gateway.keys import Scope

log = structlog.get_logger(component="dashboard")

PACKAGE_DIR = Path(__file__).resolve().parent.parent
# The repository's templates/ (a checkout or an editable install), else where a wheel puts them
# (setup.cfg's data_files: <prefix>/share/llm-gateway/templates).
_CHECKOUT_TEMPLATES = PACKAGE_DIR.parent / "templates"
TEMPLATES_DIR = (_CHECKOUT_TEMPLATES if _CHECKOUT_TEMPLATES.is_dir()
                 else Path(sys.prefix) / "share" / "llm-gateway" / "templates")
STATIC_DIR = PACKAGE_DIR / "static"
_STATIC_TYPES = {".css": "text/css", ".js": "text/javascript", ".svg": "image/svg+xml"}

NAV = (("overview", "Overview", "/dashboard"), ("jobs", "Jobs", "/dashboard/jobs"),
       ("evals", "Evals", "/dashboard/evals"), ("keys", "Keys", "/dashboard/keys"),
       ("runtime", "Runtime", "/dashboard/runtime"))

# Everything the pages load comes from the gateway itself; inline scripts and styles are refused.
_PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                               "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


class StaticFiles:
    """The dashboard's own CSS and JS, read once at start-up and served with a content hash in the URL."""

    def __init__(self, directory: Path) -> None:
        self.files: dict[str, tuple[bytes, str]] = {}
        self.versions: dict[str, str] = {}
        for path in sorted(directory.iterdir()):
            content_type = _STATIC_TYPES.get(path.suffix)
            if content_type and path.is_file():
                body = path.read_bytes()
                self.files[path.name] = (body, content_type)
                self.versions[path.name] = hashlib.sha256(body).hexdigest()[:12]

    def url(self, name: str) -> str:
        """The URL of a static file (cache-busting by content hash)."""
        return f"/dashboard/static/{name}?v={self.versions.get(name, '0')}"


STATIC = web.AppKey("dashboard_static", StaticFiles)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def page(handler: Handler) -> Handler:
    """A dashboard page: monitor scope, and browsers without a session are sent to the login form."""
    handler.login_page = True  # type: ignore[attr-defined]
    return requires_scope(Scope.MONITOR)(handler)


def _json_script(data: Any) -> Markup:
    # Inside <script> nothing is entity-decoded, so escape what could end the element or start markup.
    text = orjson.dumps(data).decode()
    return Markup(text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026"))


def _safe_next(value: str | None) -> str:
    """Only redirect within the dashboard after login (no open redirect)."""
    if value and value.startswith("/dashboard") and not value.startswith("//") and "\\" not in value:
        return value
    return "/dashboard"


def _render(request: web.Request, template: str, context: dict[str, Any], *, status: int = 200) -> web.Response:
    session = request.get(SESSION)
    base = {"nav": NAV, "key_id": request[API_KEY].id if API_KEY in request else None,
            "csrf": session.csrf if session else "", "csrf_field": CSRF_FIELD, "endpoint": "", "page": "",
            "initial_json": _json_script(None), "static": request.app[STATIC].url}
    response = aiohttp_jinja2.render_template(template, request, {**base, **context}, status=status)
    response.headers.update(_PAGE_HEADERS)
    return response


async def _page(request: web.Request, name: str, title: str, endpoint: str, data: Any, **extra: Any) -> web.Response:
    if inspect.isawaitable(data):
        data = await data
    return _render(request, f"{name}.html", {"page": name, "title": title, "endpoint": endpoint,
                                             "initial_json": _json_script(data), "data": data, **extra})


def _see_other(location: str) -> web.Response:
    return web.Response(status=303, headers={"Location": location, "Cache-Control": "no-store"})


# --- login / logout
@public
async def login_form(request: web.Request) -> web.Response:
    """GET /dashboard/login: the form taking a monitor token."""
    return _render(request, "login.html", {"title": "Log in", "next": _safe_next(request.query.get("next")),
                                           "error": None, "logged_out": "logged_out" in request.query})


@public
async def login(request: web.Request) -> web.StreamResponse:
    """POST /dashboard/login: trade a monitor token for a session cookie (401 and the form again if refused)."""
    form = await request.post()
    token = str(form.get("token", "")).strip()
    target = _safe_next(str(form.get("next", "")) or None)
    if not token:
        # 400, not 401: nothing was presented (a public route answers 401 only to a refused credential).
        return _render(request, "login.html", {"title": "Log in", "next": target, "logged_out": False,
                                               "error": "Enter a token with the monitor scope."}, status=400)
    key = request.app[KEYRING].authenticate(token)
    if key is None or not key.allows(Scope.MONITOR):
        # One message for unknown tokens and keys without the scope: the form is no oracle for which.
        log.info("dashboard_login_refused", known_key=key.id if key else None)
        return _render(request, "login.html", {"title": "Log in", "next": target, "logged_out": False,
                                               "error": "That token is not a key with the monitor scope."},
                       status=401)
    settings = request.app[SETTINGS]
    value, _ = make_cookie_value(request.app[SECRET], key.id, settings.dashboard_session_seconds)
    response = _see_other(target)
    # Secure only when the request itself came over HTTPS (behind a TLS proxy aiohttp needs to be told,
    # e.g. with aiohttp-remotes; see docs/dashboard.md): a Secure cookie over plain HTTP would be dropped.
    response.set_cookie(COOKIE_NAME, value, max_age=int(settings.dashboard_session_seconds), path="/",
                        httponly=True, samesite="Strict", secure=request.secure)
    log.info("dashboard_login", key_id=key.id)
    return response


@requires_scope(Scope.MONITOR)
async def logout(request: web.Request) -> web.StreamResponse:
    """POST /dashboard/logout (CSRF token required, checked by the auth middleware): clear the cookie."""
    response = _see_other(f"{LOGIN_PATH}?logged_out=1")
    response.del_cookie(COOKIE_NAME, path="/", httponly=True, samesite="Strict", secure=request.secure)
    return response


# --- pages
@page
async def overview_page(request: web.Request) -> web.Response:
    """GET /dashboard: runtime, realtime traffic, queue, batch in flight, recent errors."""
    return await _page(request, "overview", "Overview", "/monitor/overview", await monitor.overview_data(request.app))


@page
async def jobs_page(request: web.Request) -> web.Response:
    """GET /dashboard/jobs?status=&model=&key_id=&after=: every key's jobs, filterable, with cancel buttons."""
    filters = monitor.parse_job_filters(request.query)
    query = urlencode({k: v for k, v in filters.items() if v is not None and k != "limit"})
    data = monitor.jobs_data(request.app, filters)
    return await _page(request, "jobs", "Jobs", f"/monitor/jobs?{query}" if query else "/monitor/jobs", data,
                       filters=filters, statuses=[s.value for s in JobStatus])


@page
async def job_page(request: web.Request) -> web.Response:
    """GET /dashboard/jobs/{job_id}: one job with its result and events."""
    job_id = request.match_info["job_id"]
    return await _page(request, "job", f"Job {job_id}", f"/monitor/jobs/{job_id}",
                       monitor.job_data(request.app, job_id), job_id=job_id)


@page
async def cancel_job_form(request: web.Request) -> web.StreamResponse:
    """POST /dashboard/jobs/{job_id}/cancel (CSRF token required, checked by the auth middleware)."""
    form = await request.post()
    job_id = request.match_info["job_id"]
    back = _safe_next(str(form.get("next", "")) or "/dashboard/jobs")
    try:
        await monitor.cancel_any_job(request.app, job_id, request[API_KEY].id)
    except ApiError as exc:
        if exc.status not in (404, 409):
            raise
        # Finished or gone meanwhile: the list shows its real state, which is answer enough.
    return _see_other(back)


@page
async def evals_page(request: web.Request) -> web.Response:
    """GET /dashboard/evals: eval runs with progress bars and results."""
    return await _page(request, "evals", "Evals", "/monitor/evals",
                       {"object": "list", "data": await monitor.eval_runs(request.app)})


@page
async def keys_page(request: web.Request) -> web.Response:
    """GET /dashboard/keys: usage per key today and over 30 days, with small charts."""
    return await _page(request, "keys", "Keys", "/monitor/keys", monitor.key_usage_days(request.app))


@page
async def runtime_page(request: web.Request) -> web.Response:
    """GET /dashboard/runtime: runtime state, its history, and the crash logs."""
    app = request.app
    data = {**monitor.runtime_view(app), "history": monitor.runtime_history(app), "crash_logs": monitor.crash_logs(app)}
    return await _page(request, "runtime", "Runtime", "/monitor/runtime", data)


@page
async def crash_log_page(request: web.Request) -> web.Response:
    """GET /dashboard/runtime/crash_logs/{name}: one crash log's text."""
    log_data = monitor.read_crash_log(request.app, request.match_info["name"])
    return _render(request, "crash_log.html", {"page": "runtime", "title": log_data["name"], "log": log_data})


@public
async def static_file(request: web.Request) -> web.Response:
    """GET /dashboard/static/{name}: the dashboard's CSS and JS (public: the login page needs them)."""
    found = request.app[STATIC].files.get(request.match_info["name"])
    if found is None:
        raise web.HTTPNotFound()
    body, content_type = found
    return web.Response(body=body, content_type=content_type,
                        headers={"Cache-Control": "public, max-age=86400", "X-Content-Type-Options": "nosniff"})


def setup(app: web.Application) -> None:
    """Add the dashboard pages, their Jinja2 environment and the session secret."""
    settings = app[SETTINGS]
    app[SECRET] = settings.dashboard_secret.encode() if settings.dashboard_secret else secrets.token_bytes(32)
    app[STATIC] = StaticFiles(STATIC_DIR)
    aiohttp_jinja2.setup(app, loader=jinja2.FileSystemLoader(str(TEMPLATES_DIR)),
                         autoescape=jinja2.select_autoescape(default=True, default_for_string=True),
                         trim_blocks=True, lstrip_blocks=True)
    router = app.router
    router.add_get("/dashboard/login", login_form)
    router.add_post("/dashboard/login", login)
    router.add_post("/dashboard/logout", logout)
    router.add_get("/dashboard", overview_page)
    router.add_get("/dashboard/jobs", jobs_page)
    router.add_get("/dashboard/jobs/{job_id}", job_page)
    router.add_post("/dashboard/jobs/{job_id}/cancel", cancel_job_form)
    router.add_get("/dashboard/evals", evals_page)
    router.add_get("/dashboard/keys", keys_page)
    router.add_get("/dashboard/runtime", runtime_page)
    router.add_get("/dashboard/runtime/crash_logs/{name}", crash_log_page)
    router.add_get("/dashboard/static/{name}", static_file)
