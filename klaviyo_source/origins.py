"""The origin rule: requests, and so the API key, go only to base_url's origin.

An origin is a URL's scheme, host and port. Klaviyo's next links are absolute URLs on its own
host; one leading anywhere else was rewritten on the way (a proxy, a tampered response), and
following it, or a redirect there, would hand the key to that host. Plain http is accepted
only to this machine unless the user opts in, and a base URL's user info is never sent or shown.
"""

import ipaddress
from typing import Any, Mapping, Optional, Tuple
from urllib.parse import urljoin, urlsplit, urlunsplit

from . import settings
from .errors import KlaviyoConfigError, KlaviyoForeignOrigin, without_password

# Scheme, host and port: where a request goes, and so who may see the key.
Origin = Tuple[str, str, int]

_DEFAULT_PORTS = {"http": 80, "https": 443}
_INVALID_PORT = -1


def origin_of(url: str) -> Origin:
    """Where a URL leads, normalised: scheme and host in lower case, default ports filled in."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    try:
        port = parts.port or _DEFAULT_PORTS.get(scheme, _INVALID_PORT)
    except ValueError:
        port = _INVALID_PORT  # matches no origin, so nothing is ever sent there
    return scheme, (parts.hostname or "").lower(), port


def shown_origin(origin: Origin) -> str:
    """An origin as a user reads it; no user info, path or query, which may hold secrets."""
    scheme, host, port = origin
    bracketed = f"[{host}]" if ":" in host else host
    return f"{scheme}://{bracketed}" + (f":{port}" if port != _INVALID_PORT else "")


def without_user_info(url: str) -> str:
    """The URL without `user:password@`.

    The key takes the Authorization header, so `requests` never sent a base URL's user info
    anyway; dropped, it cannot show in a log line either.
    """
    parts = urlsplit(url)
    return urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))


def is_loopback(host: Optional[str]) -> bool:
    """Whether a host is this machine: `localhost`, 127.0.0.0/8 or ::1."""
    if not host:
        return False
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a name other than localhost may resolve anywhere


def check_base_url(base_url: str, allow_insecure_http: bool = False) -> None:
    """Reject a base URL Klaviyo could never answer, or that would carry the key unencrypted.

    Plain http would carry the key readable to every network in between, so it is refused
    unless the host is this machine (the simulator, a local proxy) or the user opted in.
    """
    parts = urlsplit(base_url)
    if (
        parts.scheme not in ("http", "https")
        or not parts.hostname
        or origin_of(base_url)[2] == _INVALID_PORT
    ):
        raise KlaviyoConfigError(
            f"base_url {without_password(base_url)!r} is not an http(s) URL. Set "
            f"[sources.klaviyo] base_url to {settings.DEFAULT_BASE_URL!r} (or your proxy's URL)."
        )
    if parts.scheme == "http" and not allow_insecure_http and not is_loopback(parts.hostname):
        raise KlaviyoConfigError(
            f"base_url {shown_origin(origin_of(base_url))} is plain http to another machine, "
            "which would send the API key unencrypted. Use https, or, on a network you trust, "
            "set [sources.klaviyo] allow_insecure_http = true "
            "(SOURCES__KLAVIYO__ALLOW_INSECURE_HTTP=true)."
        )


def refuse_other_origins(method: str, url: str, home: Origin) -> None:
    """Stop a request bound for another origin than `home` before it leaves.

    `next_link` refuses a foreign next link with a clearer message; this is the last check
    before the network, for redirects and any other way a URL could arrive.
    """
    target = origin_of(url)
    if target != home:
        raise KlaviyoForeignOrigin(
            f"Refused to send {method} to {shown_origin(target)}: requests and the API key go "
            f"only to base_url's {shown_origin(home)}. A response (a redirect) pointed "
            "elsewhere; check [sources.klaviyo] base_url and any proxy between this source "
            "and Klaviyo."
        )


def next_link(document: Mapping[str, Any], page_url: str, home: Origin) -> Optional[str]:
    """A page's `links.next`, as Klaviyo gives it, if it leads to `home`; None on the last page."""
    links = document.get("links")
    link = links.get("next") if isinstance(links, Mapping) else None
    if not link:
        return None
    url = urljoin(page_url, str(link))
    target = origin_of(url)
    if target != home:
        raise KlaviyoForeignOrigin(
            f"links.next of GET {urlsplit(page_url).path} leads to {shown_origin(target)}, "
            f"not to base_url's {shown_origin(home)}: it was not followed and the API key was "
            "not sent there. A proxy or a tampered response rewrote it; check "
            "[sources.klaviyo] base_url and any proxy between this source and Klaviyo."
        )
    return url
