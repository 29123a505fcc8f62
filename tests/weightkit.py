"""A loopback stand-in for the publishers' servers (download.pytorch.org,
dl.caffe.berkeleyvision.org): fixtures ``server`` (an HTTP server on 127.0.0.1 that every
weight URL is mirrored to, ``$ALEXNET_WEIGHTS_MIRROR``, with a fresh ``$ALEXNET_HOME``) and
``registered`` (test weight sets, registered under names of their own and removed after)."""

from __future__ import annotations

import hashlib
import http.server
import threading
from pathlib import Path

import pytest

from alexnet.interop import weights
from alexnet.interop.registry import BUILTIN, Download, WeightSet
from alexnet.runtime import paths

TV_URL = "https://download.pytorch.org/models/alexnet-owt-test.pth"
# What a registry entry says of its weights as published (taken from a built-in one in tests).
FACTS = (
    "layout",
    "preprocessing",
    "classes",
    "license",
    "top1",
    "top5",
    "protocol",
    "accuracy_source",
)


class _Handler(http.server.SimpleHTTPRequestHandler):
    cut: dict[str, int] = {}  # path -> bytes sent before the connection drops

    def log_message(self, *args) -> None:  # keep the test output clean
        pass

    def copyfile(self, source, outputfile) -> None:
        limit = self.cut.get(self.path)
        if limit is None:
            return super().copyfile(source, outputfile)
        outputfile.write(source.read(limit))  # Content-Length promised the whole file
        self.close_connection = True


@pytest.fixture
def server(tmp_path, monkeypatch):
    root = tmp_path / "www"
    root.mkdir()
    handler = type("Handler", (_Handler,), {"cut": {}})
    httpd = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), lambda *a: handler(*a, directory=str(root))
    )
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setenv(weights.ENV_MIRROR, f"http://127.0.0.1:{httpd.server_address[1]}")
    monkeypatch.setenv(paths.ENV_HOME, str(tmp_path / "home"))
    httpd.root, httpd.handler = root, handler
    yield httpd
    httpd.shutdown()
    httpd.server_close()


def serve(server, url: str, data: bytes) -> Path:
    path = server.root / url.split("/", 3)[3]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def tv_entry(data: bytes, name: str = "test-owt", sha256: str | None = None) -> WeightSet:
    """A torchvision-format weight set with ``data``'s own size and SHA-256, published facts
    (layout, preprocessing, accuracy) as torchvision's."""
    d = Download(TV_URL, sha256=sha256 or hashlib.sha256(data).hexdigest(), size=len(data))
    return WeightSet(
        name=name, format="torchvision", weights=d, **{f: getattr(BUILTIN[0], f) for f in FACTS}
    )


@pytest.fixture
def registered():
    names = []

    def add(entry: WeightSet) -> WeightSet:
        weights.register(entry)
        names.append(entry.name)
        return entry

    yield add
    for name in names:
        weights.unregister(name)
