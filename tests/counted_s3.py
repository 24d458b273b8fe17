"""An S3 server on 127.0.0.1 (moto, server mode) that counts the bytes it serves: what a reader fetches from
object storage, measured by the server, not by the reader."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import Any

import pytest


@contextlib.contextmanager
def counted_s3(monkeypatch: pytest.MonkeyPatch, counts: str) -> Iterator[list[int]]:
    """A moto S3 server for this test (the AWS_* variables point at it); yields the list of the bodies' sizes of
    the GETs whose path holds `counts`, appended as they are served."""
    import s3fs
    from moto.moto_server.threaded_moto_server import (
        DomainDispatcherApplication,
        MotoRequestHandler,
        create_backend_app,
        make_server,
    )

    served: list[int] = []
    app = DomainDispatcherApplication(create_backend_app)

    def counted(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        body = b"".join(app(environ, start_response))
        if environ["REQUEST_METHOD"] == "GET" and counts in environ.get("PATH_INFO", ""):
            served.append(len(body))
        return [body]

    server = make_server("127.0.0.1", 0, counted, True, request_handler=MotoRequestHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    host, port = server.server_address[:2]
    for k, v in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                 "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": f"http://{host}:{port}"}.items():  # fmt: skip
        monkeypatch.setenv(k, v)
    s3fs.S3FileSystem.clear_instance_cache()
    try:
        yield served
    finally:
        server.shutdown()
        s3fs.S3FileSystem.clear_instance_cache()
