"""An S3-compatible endpoint on 127.0.0.1 for the tests: moto's standalone server (``moto[server]``,
as Ray's own S3 storage tests use), a real HTTP server in its own process, with IAM
authentication on, so that wrong credentials are refused as S3 refuses them.

``MotoS3.start()`` picks a free port, starts ``python -m moto.server``, waits (by condition) until
it accepts connections, creates an IAM user allowed everything, its access key, and the buckets;
``env`` is what a process needs to reach it (endpoint, region, the key). Moto lets exactly
``INITIAL_NO_AUTH_ACTION_COUNT`` requests through before it checks signatures: the three IAM calls
that make the user and its key; everything after is signed with that key.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

from .waiting import port_free, wait_until


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MotoS3:
    def __init__(self, log_dir: Path, buckets: tuple[str, ...] = ("modelfleet",)) -> None:
        self.log_dir, self.buckets = log_dir, buckets
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None
        self.env: dict[str, str] = {}

    def start(self) -> MotoS3:
        log = open(self.log_dir / "moto.log", "wb")  # noqa: SIM115 - closed with the process
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
            env={**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "3"},
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        wait_until(lambda: self.proc.poll() is not None or not port_free(self.port), 60, "moto listening", 0.1)
        assert self.proc.poll() is None, (self.log_dir / "moto.log").read_text()[-2000:]
        import boto3

        base = {"endpoint_url": self.url, "region_name": "us-east-1"}
        iam = boto3.client("iam", aws_access_key_id="bootstrap", aws_secret_access_key="bootstrap", **base)
        iam.create_user(UserName="modelfleet")
        iam.put_user_policy(
            UserName="modelfleet",
            PolicyName="all",
            PolicyDocument=json.dumps(
                {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}
            ),
        )
        key = iam.create_access_key(UserName="modelfleet")["AccessKey"]
        self.env = {
            "AWS_ENDPOINT_URL": self.url,
            "AWS_REGION": "us-east-1",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_ACCESS_KEY_ID": key["AccessKeyId"],
            "AWS_SECRET_ACCESS_KEY": key["SecretAccessKey"],
            "AWS_EC2_METADATA_DISABLED": "true",
        }
        s3 = self.client()
        for b in self.buckets:
            s3.create_bucket(Bucket=b)
        return self

    def client(self):
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.url,
            region_name="us-east-1",
            aws_access_key_id=self.env["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=self.env["AWS_SECRET_ACCESS_KEY"],
        )

    def keys(self, bucket: str, prefix: str = "") -> list[str]:
        """Every object key under ``prefix``."""
        pages = self.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        return [o["Key"] for page in pages for o in page.get("Contents", [])]

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=30)
        wait_until(lambda: port_free(self.port), 30, f"moto's port {self.port} free")
