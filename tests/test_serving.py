"""docs/examples/serve.py: start it on 127.0.0.1, send real images, check its answers."""

from __future__ import annotations

import http.client
import json
import os
import queue
import re
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple

import pytest
import torch
from PIL import Image

import runtime
from runtime.data import CIFAR10_CLASSES, build_transform
from tests.assets import REPO_ROOT

SERVE = REPO_ROOT / "docs" / "examples" / "serve.py"
HOST = "127.0.0.1"
TIMEOUT = 30.0  # seconds, for every socket call and wait


def _request(port: int, method: str, path: str, body: bytes | None = None,
             ctype: str = "image/jpeg") -> tuple[int, dict]:
    conn = http.client.HTTPConnection(HOST, port, timeout=TIMEOUT)
    try:
        headers = {"Content-Type": ctype} if body is not None else {}
        conn.request(method, path, body=body, headers=headers)
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read(1 << 20))
    finally:
        conn.close()


def _first_line(proc: subprocess.Popen) -> str:
    """The server's startup line, or "" if it exits or stays silent for TIMEOUT seconds."""
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: lines.put(proc.stdout.readline()), daemon=True).start()
    try:
        return lines.get(timeout=TIMEOUT)
    except queue.Empty:
        return ""


@pytest.fixture(scope="module")
def packed(shared_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from packer.compress import PackRequest, pack

    folder = tmp_path_factory.mktemp("serve")
    out = folder / "r20.fb"
    source = shared_dir / "models" / "cifar10" / "resnet20-cifar10jpg.pth"
    names = folder / "classes.txt"  # as `packer compress --class-names classes.txt` reads it
    names.write_text("\n".join(CIFAR10_CLASSES) + "\n")
    pack(PackRequest(source, out, "kmeans", progress=False, class_names_file=names))
    return out


class Server(NamedTuple):
    port: int
    log: Path  # the server's stderr: one line per request


@pytest.fixture(scope="module")
def server(packed: Path, tmp_path_factory: pytest.TempPathFactory):
    log = tmp_path_factory.mktemp("serve-log") / "stderr.txt"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH")) if p)}
    with open(log, "w+b") as err:
        proc = subprocess.Popen(
            [sys.executable, str(SERVE), str(packed), "--host", HOST, "--port", "0"],
            stdout=subprocess.PIPE, stderr=err, text=True, cwd=REPO_ROOT, env=env)
        try:
            line = _first_line(proc)
            found = re.search(rf"http://{re.escape(HOST)}:(\d+)", line)
            assert found, f"no startup line ({line!r}); stderr: {log.read_text()[-2000:]}"
            bound = int(found.group(1))
            assert _request(bound, "GET", "/health")[0] == 200
            yield Server(bound, log)
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
            proc.stdout.close()


def _images(shared_dir: Path) -> list[tuple[Path, int]]:
    root = shared_dir / "data" / "cifar10" / "test"
    return [(f, label) for label, name in enumerate(CIFAR10_CLASSES)
            for f in sorted((root / name).glob("*.jpg"))[:2]]


def test_health(server: Server, packed: Path) -> None:
    status, body = _request(server.port, "GET", "/health")
    assert status == 200
    assert body == {"ok": True, "file_bytes": packed.stat().st_size, "method": "kmeans"}


def test_predictions_match_in_process(server: Server, packed: Path, shared_dir: Path) -> None:
    images = _images(shared_dir)
    assert len(images) == 20
    with ThreadPoolExecutor(4) as pool:  # concurrent requests: the server takes no lock
        answers = list(pool.map(lambda item: _request(server.port, "POST", "/predict",
                                                      item[0].read_bytes()), images))

    model = runtime.load(packed)
    transform = build_transform(runtime.open_packed(packed).model.input)
    batch = torch.stack([transform(Image.open(f).convert("RGB")) for f, _ in images])
    with torch.inference_mode():
        probs = torch.softmax(model(batch), dim=1)
    top = torch.topk(probs, 5, dim=1)

    correct = 0
    for (status, body), (_, label), values, indices in zip(
            answers, images, top.values, top.indices, strict=True):
        assert status == 200, body
        assert body["class"] == int(indices[0])
        assert body["label"] == CIFAR10_CLASSES[body["class"]]  # the names the file stores
        assert [i for i, _ in body["top5"]] == indices.tolist()
        assert [p for _, p in body["top5"]] == pytest.approx(values.tolist(), abs=1e-4)
        assert body["ms"] > 0
        correct += body["class"] == label
    assert correct >= 14, f"{correct}/20 correct"
    assert len(re.findall(r"POST /predict -> 200 ", server.log.read_text())) >= 20


def test_rejects_bad_requests(server: Server) -> None:
    port = server.port
    status, body = _request(port, "POST", "/predict", b"this is not an image")
    assert status == 400 and "image" in body["error"]
    assert _request(port, "POST", "/predict", b"\x89PNG\r\n\x1a\n" + b"\0" * 64)[0] == 400
    assert _request(port, "POST", "/predict", b"{}", ctype="application/json")[0] == 415
    assert _request(port, "GET", "/nowhere")[0] == 404

    # oversized: the server answers from the headers alone, without reading the body
    conn = http.client.HTTPConnection(HOST, port, timeout=TIMEOUT)
    try:
        conn.putrequest("POST", "/predict")
        conn.putheader("Content-Type", "image/jpeg")
        conn.putheader("Content-Length", str(11 * 1024 * 1024))
        conn.endheaders()
        resp = conn.getresponse()
        assert resp.status == 413
        assert "error" in json.loads(resp.read(1 << 20))
    finally:
        conn.close()

    status, body = _request(port, "GET", "/health")  # still serving
    assert status == 200 and body["ok"] is True
    assert "Traceback" not in server.log.read_text()  # bad input is logged as one line each
