"""An S3 client for spec.storage, and the translation of its errors into SpecErrors naming a field.

Credentials come from boto3's own chain (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE with
AWS_SHARED_CREDENTIALS_FILE, ...): in a Job the worker gets them as environment from the Secret
spec.storage.credentialsSecret names. They are never put in a message: the messages below carry the
service's error code and the URI only.
"""

from __future__ import annotations

from typing import Any

from merge_worker.spec import SpecError, Storage

# botocore's standard retry mode retries throttling, 5xx and connection errors with backoff.
RETRY_ATTEMPTS = 5
# Codes that mean the credentials, not the object, are wrong.
_ACCESS_CODES = {"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "403", "InvalidToken",
                 "ExpiredToken", "AuthorizationHeaderMalformed"}
_MISSING_CODES = {"NoSuchKey", "NoSuchBucket", "404", "NotFound"}


def make_client(storage: Storage | None) -> Any:
    import boto3
    from botocore.config import Config

    storage = storage or Storage()
    config = Config(retries={"mode": "standard", "max_attempts": RETRY_ATTEMPTS},
                    s3={"addressing_style": "path"} if storage.endpoint else {},
                    connect_timeout=10, read_timeout=60)
    session = boto3.session.Session()
    return session.client("s3", endpoint_url=storage.endpoint, config=config,
                          region_name=storage.region or session.region_name or "us-east-1")


def split_uri(uri: str) -> tuple[str, str]:
    """s3://bucket/key -> (bucket, key); the key may be empty (the whole bucket)."""
    bucket, _, key = uri.removeprefix("s3://").partition("/")
    return bucket, key


def is_missing(exc: BaseException) -> bool:
    """Whether a storage failure says the object or bucket does not exist."""
    from botocore.exceptions import ClientError

    return isinstance(exc, ClientError) and str(exc.response.get("Error", {}).get("Code", "")) in _MISSING_CODES


def storage_error(exc: BaseException, field: str, uri: str) -> SpecError | None:
    """The SpecError (exit 2) a storage failure means for `field`, or None when it is not bad input."""
    from botocore.exceptions import ClientError, EndpointConnectionError, NoCredentialsError

    if isinstance(exc, NoCredentialsError):
        return SpecError(field, f"{uri}: no S3 credentials (set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY,"
                                " or spec.storage.credentialsSecret in a cluster)")
    if isinstance(exc, EndpointConnectionError):
        return SpecError("spec.storage.endpoint", f"{uri}: cannot reach the S3 endpoint ({type(exc).__name__})")
    if isinstance(exc, ClientError):
        code = str(exc.response.get("Error", {}).get("Code", ""))
        if code in _ACCESS_CODES:
            return SpecError(field, f"{uri}: access denied ({code}): check the S3 credentials")
        if code in _MISSING_CODES:
            return SpecError(field, f"{uri}: {'no such bucket' if code == 'NoSuchBucket' else 'not found'}")
    return None
