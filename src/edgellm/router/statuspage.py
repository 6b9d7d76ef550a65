"""The router's status page (`GET /`) and its JSON (`GET /v1/federation`): members, peers,
models, splits and recent requests, as `status.federation_status` puts them together.

The page is HTML rendered here with Jinja (plain tables that work without JavaScript, one page
of peers at a time) plus `static/status.js`, which fetches the same page every few seconds and
swaps the parts that changed, and says so when the router stops answering. No build step.

Who may look (`status_page` of the router's settings): `loopback` lets callers on this machine
in without a key (`kubectl port-forward` arrives on loopback inside the pod) and asks the
others for one of the router's API keys, like every other route; `keys` asks everyone. A
request that came through a proxy (`Forwarded`, `X-Forwarded-For`) is never taken for a local
one. Browsers pass the key with HTTP Basic authentication, which they prompt for: any user
name, the key as the password; programs send `Authorization: Bearer <key>` as to the rest of
the API.
"""

import base64
import binascii
import importlib.resources
import ipaddress
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Literal

import jinja2
from fastapi import FastAPI, Request, Response
from fastapi.responses import HTMLResponse, JSONResponse
from pydantic import ValidationError

from edgellm.router.access import Access, Denied
from edgellm.router.probes import Prober
from edgellm.router.status import (
    PEER_STATES,
    FederationStatus,
    Members,
    PeerQuery,
    Sources,
    federation_status,
)
from edgellm.workerapi.protocol import invalid_request

StatusAccess = Literal["loopback", "keys"]
REFRESH_SECONDS = 2
_PROXY_HEADERS = ("forwarded", "x-forwarded-for", "x-real-ip")


@dataclass
class StatusPage:
    """What the page's routes share (`app.state.status`)."""

    sources: Sources
    members: Members
    prober: Prober
    access: Access
    who: StatusAccess

    async def status(self, query: PeerQuery) -> FederationStatus:
        self.prober.watched()
        members = await self.members.current()
        now = datetime.now(UTC)
        return federation_status(self.sources, members, self.members.error, query, now)


def _page(request: Request) -> StatusPage:
    page: StatusPage = request.app.state.status
    return page


def _from_loopback(request: Request) -> bool:
    if any(header in request.headers for header in _PROXY_HEADERS):
        return False
    try:
        return request.client is not None and ipaddress.ip_address(request.client.host).is_loopback
    except ValueError:  # not an address (a test client's name)
        return False


def bearer(authorization: str | None) -> str | None:
    """The Authorization header as the API reads it: a browser's Basic credentials (any user,
    the key as password) become the Bearer key they carry."""
    scheme, _, value = (authorization or "").partition(" ")
    if scheme.lower() != "basic":
        return authorization
    try:
        _, _, key = base64.b64decode(value.strip(), validate=True).decode().partition(":")
    except (binascii.Error, UnicodeDecodeError):
        return None
    return f"Bearer {key}"


def _refusal(request: Request, page: StatusPage) -> Denied | None:
    if page.who == "loopback" and _from_loopback(request):
        return None
    caller = page.access.check(bearer(request.headers.get("authorization")))
    return caller if isinstance(caller, Denied) else None


def _query(request: Request) -> PeerQuery | ValidationError:
    params = {k: v for k, v in request.query_params.items() if v != ""}  # a form's "all"
    try:
        return PeerQuery.model_validate(params)
    except ValidationError as e:
        return e


async def federation_json(request: Request) -> Response:
    page = _page(request)
    refusal = _refusal(request, page)
    if refusal is not None:
        return refusal.response()
    query = _query(request)
    if isinstance(query, ValidationError):
        return invalid_request(query.errors())
    status = await page.status(query)
    return JSONResponse(status.model_dump(mode="json", by_alias=True))


async def status_html(request: Request) -> Response:
    page = _page(request)
    refusal = _refusal(request, page)
    if refusal is not None:
        headers = {"Cache-Control": "no-store"}
        if refusal.status == 401:
            headers["WWW-Authenticate"] = 'Basic realm="EdgeLLM router", charset="UTF-8"'
        body = _TEMPLATES.get_template("refused.html").render(refusal=refusal)
        return HTMLResponse(body, status_code=refusal.status, headers=headers)
    query = _query(request)
    if isinstance(query, ValidationError):
        body = _TEMPLATES.get_template("refused.html").render(invalid=query.errors())
        return HTMLResponse(body, status_code=400)
    status = await page.status(query)
    body = _TEMPLATES.get_template("status.html").render(
        status=status, query=query, states=PEER_STATES, refresh=REFRESH_SECONDS
    )
    return HTMLResponse(body, headers={"Cache-Control": "no-store"})


async def script(request: Request) -> Response:
    return Response(_SCRIPT, media_type="text/javascript")


def add_routes(app: FastAPI, page: StatusPage) -> None:
    app.state.status = page
    app.add_api_route("/", status_html, methods=["GET"], response_model=None)
    app.add_api_route("/status.js", script, methods=["GET"], response_model=None)
    app.add_api_route("/v1/federation", federation_json, methods=["GET"], response_model=None)


def _ago(seconds: float | None) -> str:
    if seconds is None:
        return "never"
    seconds = max(seconds, 0.0)
    if seconds < 90:
        return f"{seconds:.0f} s ago"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min ago"
    return f"{seconds / 3600:.1f} h ago"


def _since(moment: datetime | None, now: datetime) -> str:
    return _ago(None if moment is None else (now - moment).total_seconds())


def _environment() -> jinja2.Environment:
    environment = jinja2.Environment(
        loader=jinja2.PackageLoader("edgellm.router", "templates"),
        autoescape=True,
        trim_blocks=True,
        lstrip_blocks=True,
        undefined=jinja2.StrictUndefined,
    )
    environment.filters["ago"] = _ago
    environment.globals["since"] = _since
    return environment


_TEMPLATES = _environment()
_SCRIPT = (importlib.resources.files("edgellm.router") / "static" / "status.js").read_text()
