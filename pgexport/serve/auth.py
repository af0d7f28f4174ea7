"""The API key: with one set, every request but `GET /health` and `GET /metrics` needs
`Authorization: Bearer KEY` (the OpenAI clients send their `api_key` so), else 401.

The key is compared with `hmac.compare_digest`, whose time does not depend on where the first
wrong byte is. Everything outside the public paths needs the key (not only `/v1/*`), so an
unknown or oddly spelled path never reaches the router without it.

    >>> app = RequireApiKey(app, read_api_key(None, "key.txt"))  # doctest: +SKIP
"""

from __future__ import annotations

import hmac
from pathlib import Path

from starlette.responses import JSONResponse

from pgexport.errors import PgExportError
from pgexport.serve.protocol import error_body

PUBLIC_PATHS = ("/health", "/metrics")


def read_api_key(key: str | None, key_file: str | None) -> str | None:
    """The key from --api-key or the first line of --api-key-file (None: no key)."""
    if key and key_file:
        raise PgExportError("pass --api-key or --api-key-file, not both")
    if key_file:
        try:
            key = Path(key_file).read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as e:
            raise PgExportError(f"cannot read --api-key-file {key_file}: {getattr(e, 'strerror', None) or e}; "
                                "check the path") from None
        if not key:
            raise PgExportError(f"--api-key-file {key_file} is empty; write the key in it")
    if key is not None and not key.strip():
        raise PgExportError("--api-key is empty; pass a key, or leave the option out")
    return key


class RequireApiKey:
    """ASGI middleware: see the module docstring."""

    def __init__(self, app, key: str | None):
        self.app = app
        self.key = key.encode() if key else None

    def allowed(self, scope) -> bool:
        if self.key is None or scope["path"] in PUBLIC_PATHS:
            return True
        header = dict(scope["headers"]).get(b"authorization", b"")
        scheme, _, token = header.partition(b" ")
        return scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self.key)

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and not self.allowed(scope):
            body = error_body(401, "missing or wrong API key; send the header Authorization: Bearer KEY "
                              "(the OpenAI client's api_key)", code="invalid_api_key")
            await JSONResponse(body, 401, headers={"WWW-Authenticate": "Bearer"})(scope, receive, send)
            return
        await self.app(scope, receive, send)
