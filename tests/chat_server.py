"""A local HTTP server speaking the OpenAI chat-completions format, as ``vllm serve`` does, for the judge's tests."""

from __future__ import annotations

import base64
import io
import json
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from PIL import Image

Respond = Callable[[Image.Image, str], "tuple[int, str]"]
"""(the request's image, its text) -> (HTTP status, reply text)."""


@contextmanager
def chat_server(respond: Respond) -> Iterator[str]:
    """Serves ``/v1/chat/completions`` with ``respond``'s answers; yields the base URL (``http://127.0.0.1:N/v1``)."""

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            try:
                self._reply()
            except (BrokenPipeError, ConnectionResetError):  # the client gave up (its timeout)
                pass

        def _reply(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            image_block, text_block = body["messages"][0]["content"]
            png = base64.b64decode(image_block["image_url"]["url"].split(",", 1)[1])
            status, text = respond(Image.open(io.BytesIO(png)), text_block["text"])
            self.send_response(status)
            if status != 200:
                self.end_headers()
                return
            reply = json.dumps({"choices": [{"message": {"content": text}}]}).encode()
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(reply)))
            self.end_headers()
            self.wfile.write(reply)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_port}/v1"
    finally:
        server.shutdown()
        server.server_close()
