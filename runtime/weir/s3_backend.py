"""The S3 backend of the checkpoint store: one bucket of an S3-compatible server through boto3.

``S3Backend`` implements ``weir.objectstores.Backend`` with one boto3 client, path-style
addressing, the transfer manager for large files, short timeouts and few retries, and turns
boto3's errors into the store's (``NotFound``, ``StoreRefused``, else a retryable
``CheckpointError``). ``weir.objectstores.open_backend`` makes one for ``s3://`` URLs. boto3
and botocore are imported only here (and only when a backend is created).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from weir.objectstores import CHUNK, CheckpointError, NotFound, ObjectInfo, S3Settings, StoreRefused

__all__ = ["S3Backend"]

# S3 error codes that a retry cannot fix. AccessDenied also covers a missing permission; an
# expired token is a credential the user (or the pod's identity) has to renew.
_REFUSED_CODES = frozenset({
    "AccessDenied", "AllAccessDisabled", "InvalidAccessKeyId", "SignatureDoesNotMatch",
    "InvalidToken", "ExpiredToken", "TokenRefreshRequired", "NoSuchBucket", "InvalidBucketName",
    "AuthorizationHeaderMalformed", "PermanentRedirect", "IllegalLocationConstraintException",
    "InvalidRequest", "AccountProblem", "301", "403",
})
_CREDENTIALS_HINT = (
    "check AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (spec.checkpoint.credentialsSecret) "
    "or the pod's IAM role"
)
_REFUSED_HINTS = {
    "InvalidAccessKeyId": _CREDENTIALS_HINT,
    "SignatureDoesNotMatch": _CREDENTIALS_HINT,
    "InvalidToken": _CREDENTIALS_HINT,
    "ExpiredToken": _CREDENTIALS_HINT,
    "AccessDenied": "the credentials may not use this bucket or prefix",
    "NoSuchBucket": "create the bucket, or fix the bucket in spec.checkpoint.url",
    "404": "create the bucket, or fix the bucket in spec.checkpoint.url and spec.checkpoint.endpoint",
    "AuthorizationHeaderMalformed": "set spec.checkpoint.region (AWS_REGION) to the bucket's region",
    "PermanentRedirect": "set spec.checkpoint.region (AWS_REGION) to the bucket's region",
    "301": "set spec.checkpoint.region (AWS_REGION) to the bucket's region",
}


class S3Backend:
    """One bucket of an S3-compatible server through one boto3 client."""

    scheme = "s3"

    def __init__(self, bucket: str, settings: S3Settings | None = None) -> None:
        import boto3
        from boto3.s3.transfer import TransferConfig
        from botocore.config import Config

        s = settings or S3Settings()
        self.bucket = bucket
        self.settings = s
        try:
            self._client = boto3.session.Session().client(
                "s3",
                endpoint_url=s.endpoint_url,
                region_name=s.region or "us-east-1",
                aws_access_key_id=s.access_key_id,
                aws_secret_access_key=s.secret_access_key,
                aws_session_token=s.session_token,
                config=Config(
                    s3={"addressing_style": "path" if s.path_style else "auto"},
                    retries={"max_attempts": s.max_attempts, "mode": "standard"},
                    connect_timeout=s.connect_timeout_s,
                    read_timeout=s.read_timeout_s,
                ),
            )
        except ValueError as exc:  # e.g. "Invalid endpoint: htp//minio:9000"
            raise StoreRefused(f"S3 client for s3://{bucket}: {exc}") from exc
        self._transfer = TransferConfig(
            multipart_threshold=s.multipart_threshold_bytes,
            multipart_chunksize=s.multipart_chunk_bytes,
            max_concurrency=s.max_concurrency,
        )

    def _where(self, key: str) -> str:
        return f"s3://{self.bucket}/{key}"

    def _fail(self, what: str, key: str, exc: Exception) -> CheckpointError:
        """The backend error for ``exc``: NotFound, StoreRefused (see ``_REFUSED_CODES``), else a
        CheckpointError worth retrying. The message names the object and the cause on one line,
        never the credentials."""
        from botocore.exceptions import ClientError, NoCredentialsError, PartialCredentialsError

        cause = " ".join(str(exc).split())
        if isinstance(exc, ClientError):
            code = str(exc.response.get("Error", {}).get("Code", ""))
            if code in ("404", "NoSuchKey", "NotFound") and what != "listing":
                return NotFound(f"{self._where(key)} does not exist")
            if code in _REFUSED_CODES or (code == "404" and what == "listing"):
                hint = _REFUSED_HINTS.get(code, "")
                return StoreRefused(
                    f"{what} {self._where(key)} refused by {self._endpoint()}: {cause}"
                    + (f" ({hint})" if hint else "")
                )
        if isinstance(exc, (NoCredentialsError, PartialCredentialsError)):
            return StoreRefused(
                f"{what} {self._where(key)}: {cause} (set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, "
                "spec.checkpoint.credentialsSecret, or the pod's IAM role)"
            )
        return CheckpointError(f"{what} {self._where(key)} failed: {cause}")

    def _endpoint(self) -> str:
        return self.settings.endpoint_url or "S3"

    def put_bytes(self, key: str, data: bytes) -> None:
        try:
            self._client.put_object(Bucket=self.bucket, Key=key, Body=data)
        except Exception as exc:
            raise self._fail("writing", key, exc) from exc

    def put_file(self, key: str, path: Path) -> None:
        try:
            self._client.upload_file(str(path), self.bucket, key, Config=self._transfer)
        except Exception as exc:
            raise self._fail("uploading to", key, exc) from exc

    def get_bytes(self, key: str) -> bytes:
        try:
            body = self._client.get_object(Bucket=self.bucket, Key=key)["Body"]
            with contextlib.closing(body):
                return bytes(body.read())
        except Exception as exc:
            raise self._fail("reading", key, exc) from exc

    def get_file(self, key: str, path: Path) -> None:
        try:
            self._client.download_file(self.bucket, key, str(path), Config=self._transfer)
        except Exception as exc:
            raise self._fail("downloading", key, exc) from exc

    def read_chunks(self, key: str) -> Iterator[bytes]:
        try:
            body = self._client.get_object(Bucket=self.bucket, Key=key)["Body"]
        except Exception as exc:
            raise self._fail("reading", key, exc) from exc
        return self._chunks(key, body)

    def _chunks(self, key: str, body: Any) -> Iterator[bytes]:
        with contextlib.closing(body):
            try:
                yield from body.iter_chunks(CHUNK)
            except Exception as exc:
                raise self._fail("reading", key, exc) from exc

    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        try:
            pages = self._client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix)
            for page in pages:
                for obj in page.get("Contents", ()):
                    yield ObjectInfo(str(obj["Key"]), int(obj["Size"]))
        except Exception as exc:
            raise self._fail("listing", prefix, exc) from exc

    def delete(self, keys: Sequence[str]) -> None:
        for i in range(0, len(keys), 1000):
            batch = keys[i : i + 1000]
            try:
                done = self._client.delete_objects(
                    Bucket=self.bucket, Delete={"Objects": [{"Key": k} for k in batch], "Quiet": True}
                )
            except Exception as exc:
                raise self._fail("deleting", batch[0], exc) from exc
            errors = done.get("Errors") or []
            if errors:
                first = errors[0]
                raise CheckpointError(
                    f"deleting {self._where(str(first.get('Key')))} failed: {first.get('Code')} "
                    f"{first.get('Message')} ({len(errors)} objects not deleted)"
                )

    def close(self) -> None:
        self._client.close()
