"""The browser pages: `/ui` (the console) and `/docs` (the API document, rendered).

Plain files shipped in the package (coordinator/web/static): nothing is built at install time
and nothing is fetched from anywhere else, so the pages work offline. They speak only the
public HTTP API, with the token the user typed (kept in sessionStorage). Every answer here
carries a Content-Security-Policy that allows scripts, styles and fetches from this origin
only and no inline script, so data shown in the page (task names, logs) cannot run as code
even if it got past the pages' own escaping (they only ever set `textContent`).

Public like `/health` (see coordinator/web/openapi.py): the pages hold no data.
"""

from __future__ import annotations

from importlib import resources

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from coordinator.web.api import error

CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'none'; "
    "frame-ancestors 'none'"
)
HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}
MEDIA = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
         ".css": "text/css; charset=utf-8"}
PAGES = {"/ui": "console.html", "/docs": "docs.html"}


def load_static() -> dict[str, bytes]:
    """Every page and asset, read once when the app is built (not on the event loop)."""
    root = resources.files("coordinator.web") / "static"
    return {f.name: f.read_bytes() for f in root.iterdir()
            if f.is_file() and any(f.name.endswith(ext) for ext in MEDIA)}


def _answer(name: str, body: bytes) -> Response:
    media = next(m for ext, m in MEDIA.items() if name.endswith(ext))
    return Response(body, media_type=media, headers=HEADERS)


def ui_routes() -> list[Route]:
    files = load_static()

    async def page(request: Request) -> Response:
        name = PAGES[request.url.path]
        return _answer(name, files[name])

    async def asset(request: Request) -> Response:
        name = request.path_params["name"]
        if name.endswith(".html") or name not in files:
            return error(404, "not found", f"no asset {name!r}")
        return _answer(name, files[name])

    return [Route(path, page) for path in PAGES] + [Route("/ui/assets/{name}", asset)]
