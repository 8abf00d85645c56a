"""An S3-compatible HTTP server on loopback for the object-store tests and benchmarks:
moto's standalone server (`ThreadedMotoServer`) on a free port, with the standard `AWS_*`
variables that point obstore (and boto3) at it."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator


@contextlib.contextmanager
def moto_s3() -> Iterator[dict[str, str]]:
    """Start the server; yield the AWS_* environment a client needs to reach it."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no line per request
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        yield {"AWS_ENDPOINT_URL": f"http://{host}:{port}", "AWS_ALLOW_HTTP": "true",
               "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
               "AWS_REGION": "us-east-1"}
    finally:
        server.stop()


def create_bucket(env: dict[str, str], bucket: str) -> None:
    """Buckets are made with boto3 (moto's own dependency): obstore cannot create one."""
    import boto3

    boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], region_name=env["AWS_REGION"],
                 aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
                 aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"]).create_bucket(
        Bucket=bucket)


def apply(env: dict[str, str]) -> dict[str, str | None]:
    """Set `env` in os.environ; returns what to restore."""
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    return old
