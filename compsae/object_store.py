"""One-line errors for an object store (s3:// through s3fs and botocore) that cannot be used: no
credentials, credentials refused, access denied, endpoint unreachable.

botocore is optional (the `s3` extra), so its exceptions are recognised by class name, anywhere in
an exception's cause chain (s3fs turns some of them into OSErrors with the botocore error as
cause; zarr and fsspec may wrap them again).
"""

from __future__ import annotations

from collections.abc import Iterator

from compsae.errors import UserError

CREDENTIALS_HOW = (
    "set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (and AWS_SESSION_TOKEN for temporary "
    "credentials), or AWS_PROFILE naming a profile in ~/.aws/credentials; for a public bucket "
    "set FSSPEC_S3='{\"anon\": true}'"
)
_MISSING = {
    "NoCredentialsError",
    "PartialCredentialsError",
    "CredentialRetrievalError",
    "ProfileNotFound",
    "InvalidConfigError",
}
_UNREACHABLE = {
    "EndpointConnectionError",
    "ConnectTimeoutError",
    "ConnectionClosedError",
    "ReadTimeoutError",
    "ProxyConnectionError",
    "SSLError",
    "InvalidEndpointError",
}
_REFUSED_CODES = {
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "ExpiredToken",
    "InvalidToken",
    "TokenRefreshRequired",
    "AccessDenied",
    "AllAccessDisabled",
    "InvalidClientTokenId",
    "UnrecognizedClientException",
}


def _chain(error: BaseException) -> Iterator[BaseException]:
    """`error`, then its causes and contexts, each once."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def _is_botocore(error: BaseException, names: set[str]) -> bool:
    return any(
        cls.__name__ in names and cls.__module__.startswith("botocore")
        for cls in type(error).__mro__
    )


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0][:200]}" if text else type(error).__name__


def object_store_error(error: BaseException) -> UserError | None:
    """A UserError saying what is missing or wrong and how to fix it when `error` comes from an
    object store that cannot be used; None for any other error."""
    for e in _chain(error):
        if _is_botocore(e, _MISSING):
            return UserError(
                f"no usable credentials for the s3:// object store ({_first_line(e)}); "
                f"{CREDENTIALS_HOW}"
            )
        if _is_botocore(e, _UNREACHABLE):
            return UserError(
                f"cannot reach the s3:// object store ({_first_line(e)}); check the network, or "
                "AWS_ENDPOINT_URL when the store is S3-compatible (MinIO, ...)"
            )
        code = (
            (getattr(e, "response", None) or {}).get("Error", {}).get("Code")
            if _is_botocore(e, {"ClientError"})
            else None
        )
        if code in _REFUSED_CODES:
            return UserError(
                f"the s3:// object store refused the request ({code}: "
                f"{_first_line(e).split(': ', 1)[-1]}); use credentials allowed to read and write "
                f"that bucket: {CREDENTIALS_HOW}"
            )
    return None
