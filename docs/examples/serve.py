"""Serve a packed model over HTTP with nothing but the standard library and `runtime`.

    python docs/examples/serve.py r20.fb --host 127.0.0.1 --port 8000
    curl -s --data-binary @cat.jpg -H 'Content-Type: image/jpeg' localhost:8000/predict
    curl -s localhost:8000/health

POST /predict takes raw JPEG/PNG bytes and answers
{"class": 3, "label": "cat", "top5": [[3, 0.91], ...], "ms": 4.2}. See docs/SERVING.md.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import os
import time
import warnings
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import torch
from PIL import Image

import runtime
from runtime.data import build_transform

MAX_BODY = 10 * 1024 * 1024  # bytes; larger bodies get 413 before a byte of them is read
Image.MAX_IMAGE_PIXELS = 40_000_000  # a small PNG can decode to gigabytes: refuse those
warnings.simplefilter("error", Image.DecompressionBombWarning)
BAD_IMAGE = (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombWarning,
             Image.DecompressionBombError)
log = logging.getLogger("serve")


class Predictor:
    """The model, its preprocessing and its labels, loaded once and shared by every thread."""

    def __init__(self, path: str) -> None:
        with runtime.open_packed(path) as packed:
            info = packed.model
            self.labels = runtime.class_names(packed)  # the file's, ImageNet's, or None
        self.model = runtime.load(path)  # eval mode, CPU; read-only from here on
        self.transform = build_transform(info.input)
        self.health = {"ok": True, "file_bytes": os.path.getsize(path), "method": info.method}

    def __call__(self, img: Image.Image) -> dict:
        x = self.transform(img).unsqueeze(0)
        with torch.inference_mode():  # no autograd state: safe to run from many threads at once
            probs = torch.softmax(self.model(x)[0], dim=0)
        top = torch.topk(probs, min(5, probs.numel()))
        top5 = [[int(i), round(float(p), 6)] for p, i in zip(top.values, top.indices, strict=True)]
        best = top5[0][0]
        return {"class": best, "label": self.labels[best] if self.labels else None, "top5": top5}


class Handler(BaseHTTPRequestHandler):
    predictor: Predictor  # set on the class before the server starts
    timeout = 30  # seconds a client may take to send its request before the socket is closed
    server_version = "weightpack-serve/1"

    def do_GET(self) -> None:
        if self.path == "/health":
            self._reply(200, self.predictor.health)
        else:
            self._reply(404, {"error": "not found: use POST /predict or GET /health"})

    def do_POST(self) -> None:
        if self.path != "/predict":
            return self._reply(404, {"error": "not found: use POST /predict"})
        ctype = self.headers.get("Content-Type", "")
        if not ctype.startswith("image/"):
            return self._reply(415, {"error": "send the raw image with Content-Type image/*"})
        length = self.headers.get("Content-Length", "")
        if not length.isdecimal():
            return self._reply(411, {"error": "Content-Length is required"})
        if int(length) > MAX_BODY:
            return self._reply(413, {"error": f"body over {MAX_BODY} bytes"})
        try:
            img = Image.open(io.BytesIO(self.rfile.read(int(length))))
            img.load()  # decode now: a corrupt or truncated file fails here
        except BAD_IMAGE:
            return self._reply(400, {"error": "body is not a readable image (JPEG or PNG)"})
        try:
            result = self.predictor(img)
        except Exception:  # log the traceback here; the client only learns that it failed
            log.exception("predict failed")
            return self._reply(500, {"error": "internal error"})
        self._reply(200, {**result, "ms": round((time.perf_counter() - self.started) * 1e3, 2)})

    def parse_request(self) -> bool:
        self.started = time.perf_counter()
        return super().parse_request()

    def _reply(self, status: int, payload: dict) -> None:
        data = json.dumps(payload).encode()
        log.info("%s %s %s -> %d %.1f ms", self.client_address[0], self.command, self.path,
                 status, (time.perf_counter() - self.started) * 1e3)
        self.send_response(status)  # HTTP/1.0: the connection closes after every reply
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        pass  # _reply has logged this request's one line, with its latency

    def log_message(self, format: str, *args: object) -> None:  # malformed requests, timeouts
        log.warning("%s %s", self.client_address[0], format % args)


def main() -> None:
    parser = argparse.ArgumentParser(description="Serve a packed model over HTTP.")
    parser.add_argument("model", help="packed .fb file")
    parser.add_argument("--host", default="127.0.0.1", help="0.0.0.0 listens on every interface")
    parser.add_argument("--port", type=int, default=8000, help="0 picks a free port")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads per request; requests already run in parallel")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)  # N concurrent requests x threads <= cores, ideally

    Handler.predictor = Predictor(args.model)
    server = ThreadingHTTPServer((args.host, args.port), Handler)  # a thread per connection
    host, port = server.server_address[:2]
    print(f"serving {args.model} on http://{host}:{port}", flush=True)
    with server, contextlib.suppress(KeyboardInterrupt):
        server.serve_forever()


if __name__ == "__main__":
    main()
