"""notes: a small HTTP service for the corral demo. Standard library only.

    GET  /health        -> "ok"
    GET  /notes         -> every note, one JSON object per line
    POST /notes         -> appends the request body (UTF-8 text, at most 4 KiB) as a note

Notes are kept in DATA_DIR/notes.jsonl: the service's only persistent state, on a corral volume.
"""

import json
import os
import socketserver
import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

DATA_DIR = os.environ.get("NOTES_DIR", "/srv/notes")
MAX_NOTE = 4096


class Handler(BaseHTTPRequestHandler):
    server_version = "notes/1"

    def _send(self, code: int, body: bytes, kind: str = "text/plain; charset=utf-8") -> None:
        self.send_response(code)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        if self.path == "/health":
            self._send(200, b"ok\n")
        elif self.path == "/notes":
            try:
                with open(os.path.join(DATA_DIR, "notes.jsonl"), "rb") as handle:
                    body = handle.read()
            except FileNotFoundError:
                body = b""
            self._send(200, body, "application/x-ndjson")
        else:
            self._send(404, b"not found\n")

    def do_POST(self) -> None:
        if self.path != "/notes":
            self._send(404, b"not found\n")
            return
        length = int(self.headers.get("Content-Length") or 0)
        if not 0 < length <= MAX_NOTE:
            self._send(413, b"a note is 1 to 4096 bytes\n")
            return
        text = self.rfile.read(length).decode("utf-8", "replace")
        record = json.dumps({"at": time.time(), "text": text}) + "\n"
        with open(os.path.join(DATA_DIR, "notes.jsonl"), "a") as handle:
            handle.write(record)
            handle.flush()
            os.fsync(handle.fileno())
        self._send(201, b"stored\n")

    def log_message(self, fmt: str, *args: object) -> None:
        sys.stderr.write("notes: " + (fmt % args) + "\n")


class Server(ThreadingHTTPServer):
    def server_bind(self) -> None:
        # HTTPServer.server_bind looks its own name up in the DNS (socket.getfqdn): a query a
        # notes service has no reason to make, and its manifest does not allow it.
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = "notes", self.server_address[1]


def main() -> None:
    port = int(sys.argv[1]) if len(sys.argv) > 1 else 8080
    Server(("0.0.0.0", port), Handler).serve_forever()


if __name__ == "__main__":
    main()
