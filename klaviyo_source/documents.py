"""A successful response's body as a document: read in one call, decoded once.

The body is read and decoded inside the retried request, so that a cut or garbled body is asked
for again like a dropped connection, while whole JSON in a shape the revision does not document
is not: asked again, Klaviyo would send the same. Member pages are decoded by `member_pages`
(msgspec), every other body by dlt's JSON. Error bodies are left to `requests`, which keeps
them readable for the error messages.
"""

from typing import Any, Callable, Dict

import msgspec
from dlt.common import json
from requests import Response

from . import settings
from .errors import InvalidResponseBody, UnexpectedDocument, request_of

Document = Dict[str, Any]
Decoder = Callable[[bytes], Any]


def decode_json(body: bytes) -> Any:
    """Any JSON body, as Python objects."""
    return json.loadb(body)


def read_document(response: Response, decode: Decoder = decode_json) -> Document:
    """The decoded body of a successful response sent with `stream=True` ({} when empty).

    The body is read in one call rather than in `requests`' 10 KB steps: a 150 KB page took 16
    steps through five layers, each giving up and taking back the GIL, which with several walks
    at once cost 6 % of an export's CPU. `iter_content` keeps `requests`' translation of
    urllib3's errors (a cut body is a `ChunkedEncodingError`).
    """
    body = b"".join(response.iter_content(chunk_size=None))
    if not body:
        return {}
    try:
        document: Document = decode(body)
    except msgspec.ValidationError as shape_error:
        revision = response.request.headers.get("revision", "") if response.request else ""
        raise UnexpectedDocument(
            f"Klaviyo answered {_request_line(response)} with JSON this source cannot read "
            f"({shape_error}). Check [sources.klaviyo] revision (sent: {revision!s}; the "
            f"source is built for {settings.DEFAULT_REVISION}) and base_url.",
            response=response,
        ) from None
    except (ValueError, msgspec.DecodeError) as parse_error:
        content_type = response.headers.get("Content-Type", "").split(";")[0].strip()
        # A proxy or a wrong base_url answers with a page; a dropped body is cut JSON.
        what = (
            f"{content_type} instead of JSON"
            if content_type and "json" not in content_type
            else "an incomplete JSON body"
        )
        raise InvalidResponseBody(
            f"Klaviyo sent {what} ({len(body)} bytes) for {_request_line(response)}",
            response=response,
        ) from parse_error
    return document


def _request_line(response: Response) -> str:
    return " ".join(request_of(response))
