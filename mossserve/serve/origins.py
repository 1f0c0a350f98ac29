"""Which browser pages may act on this server where CORS does not guard: a websocket is not held to
CORS, and a multipart POST is a "simple" request a page of any site may send (it cannot read the
answer, but the upload is done). So without an API key any web page could drive a server on
localhost. A browser names the page's site in `Origin`; other clients send none."""
from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from urllib.parse import urlsplit

log = logging.getLogger("mossserve")


def origin_allowed(headers: Mapping[str, str], cors_origins: Iterable[str], what: str) -> bool:
    """True for no Origin, this server's own pages (the playground) or an origin `--cors-origin`
    allows, as its HTTP calls would be. Behind a proxy, this server's host is the one the proxy names
    (X-Forwarded-Host, which a page's script cannot set) or passes on (Host). A refusal is logged with
    the headers compared (`what`: the route)."""
    origin = headers.get("origin")
    allowed = {o.rstrip("/") for o in cors_origins}
    if origin is None or "*" in allowed or origin in allowed:
        return True
    page = urlsplit(origin)
    hosts = [headers.get("host", ""), *headers.get("x-forwarded-host", "").split(",")]
    if _host_port(page.netloc, page.scheme) in {_host_port(h.strip(), page.scheme) for h in hosts if h.strip()}:
        return True
    log.warning("%s refused: origin %r is not this server's (Host %r, X-Forwarded-Host %r) nor one --cors-origin "
                "allows", what, origin, headers.get("host"), headers.get("x-forwarded-host"))
    return False


def _host_port(netloc: str, scheme: str) -> str:
    """`netloc` lower-cased, without the scheme's default port (tts.example:443 is tts.example)."""
    default = {"https": ":443", "http": ":80"}.get(scheme, "")
    netloc = netloc.lower()
    return netloc.removesuffix(default) if default else netloc
