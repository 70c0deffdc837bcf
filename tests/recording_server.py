"""Another origin on this machine: an HTTP server that records every request it receives.

It stands for the host a rewritten `links.next` or a redirect would lead to, so a test can
assert that nothing, least of all the API key, ever arrived there. It answers every request
with an empty last page, as a host that wanted the key would, so a client that did follow the
link would go on as if the walk were complete.
"""

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any, Dict, List, NamedTuple, Optional, Type

EMPTY_LAST_PAGE = b'{"data": [], "links": {"self": null, "next": null, "prev": null}}'


class Received(NamedTuple):
    method: str
    path: str
    headers: Dict[str, str]


class RecordingServer:
    """Serves on 127.0.0.1 at a free port; `received` lists what came in, headers included."""

    def __init__(self) -> None:
        self.received: List[Received] = []
        recording = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
                recording.received.append(Received("GET", self.path, dict(self.headers.items())))
                self.send_response(200)
                self.send_header("Content-Type", "application/vnd.api+json")
                self.send_header("Content-Length", str(len(EMPTY_LAST_PAGE)))
                self.end_headers()
                self.wfile.write(EMPTY_LAST_PAGE)

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
                """No access log on stderr."""

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.origin = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> "RecordingServer":
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: Optional[Type[BaseException]],
        exc: Optional[BaseException],
        tb: Optional[TracebackType],
    ) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()

    def saw(self, text: str) -> bool:
        """Whether `text` arrived in any request line or header."""
        return any(
            text in received.path or any(text in value for value in received.headers.values())
            for received in self.received
        )
