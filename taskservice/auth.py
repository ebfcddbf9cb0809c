"""Optional caller authentication: Google-signed ID tokens, checked in the service.

Cloud Run IAM (roles/run.invoker) is the front door; this is defense in depth.
With TASKSERVICE_AUTH=google-id-token every TaskService call must carry
`authorization: Bearer <ID token>` whose signature (Google's published
certificates), expiry, issuer and audience (TASKSERVICE_AUDIENCE) verify, and
whose verified email is on TASKSERVICE_ALLOWED_CALLERS. Missing or invalid
token: UNAUTHENTICATED; valid but not allowed: PERMISSION_DENIED; the messages
say no more than the code. Health and reflection stay open for probes.

Certificates are fetched off the event loop, cached for their max-age, and
refetched (at most every 30 s) when a token names an unknown key. Verified
tokens are cached until they expire, so a caller's repeated calls cost one
dictionary look-up.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
import urllib.request
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import grpc

from taskservice.config import GOOGLE_CERTS_URL
from taskservice.errors import ServiceError, Unavailable

log = logging.getLogger(__name__)

ISSUERS = frozenset({"accounts.google.com", "https://accounts.google.com"})
OPEN_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")
_MAX_CACHED_TOKENS = 4096
_REFETCH_INTERVAL = 30.0
_MAX_AGE = re.compile(r"max-age=(\d+)")


class Unauthenticated(ServiceError):
    code = grpc.StatusCode.UNAUTHENTICATED
    reason = "UNAUTHENTICATED"


class PermissionDenied(ServiceError):
    code = grpc.StatusCode.PERMISSION_DENIED
    reason = "PERMISSION_DENIED"


def _fetch_certs(url: str) -> tuple[dict[str, str], float]:
    with urllib.request.urlopen(url, timeout=5) as response:
        certs = json.loads(response.read())
        match = _MAX_AGE.search(response.headers.get("Cache-Control", ""))
    max_age = float(match.group(1)) if match else 300.0
    if not isinstance(certs, dict):
        raise ValueError("certificate document is not an object")
    return {str(k): str(v) for k, v in certs.items()}, max_age


class IdTokenVerifier:
    """Verifies Google ID tokens for one audience and a set of allowed emails."""

    def __init__(
        self,
        audience: str,
        allowed_callers: Iterable[str],
        certs_url: str = GOOGLE_CERTS_URL,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.audience = audience
        self.allowed = frozenset(e.strip().lower() for e in allowed_callers if e.strip())
        self.certs_url = certs_url
        self._clock = clock
        self._certs: dict[str, str] = {}
        self._certs_expire = 0.0
        self._last_fetch = -_REFETCH_INTERVAL
        self._fetching: asyncio.Lock | None = None
        self._verified: dict[str, tuple[str, float]] = {}  # token -> (email, exp)

    async def _certificates(self, kid: str | None) -> dict[str, str]:
        now = self._clock()
        stale = now >= self._certs_expire
        unknown = kid is not None and kid not in self._certs
        if not stale and not (unknown and now - self._last_fetch >= _REFETCH_INTERVAL):
            return self._certs
        if self._fetching is None:
            self._fetching = asyncio.Lock()
        async with self._fetching:
            if self._clock() - self._last_fetch < 1.0 and self._certs:
                return self._certs  # another call just fetched
            try:
                certs, max_age = await asyncio.to_thread(_fetch_certs, self.certs_url)
            except Exception as exc:
                log.warning("cannot fetch token certificates: %s", exc)
                if self._certs:
                    return self._certs
                raise Unavailable("cannot verify credentials right now; retry") from None
            self._certs = certs
            self._last_fetch = self._clock()
            self._certs_expire = self._last_fetch + max_age
        return self._certs

    async def verify(self, authorization: str | None) -> str:
        """The caller's email; raises Unauthenticated or PermissionDenied."""
        denied = Unauthenticated("missing or invalid credentials")
        if not authorization or not authorization.startswith("Bearer "):
            raise denied
        token = authorization[len("Bearer ") :].strip()
        cached = self._verified.get(token)
        if cached is not None and cached[1] > self._clock():
            email = cached[0]
        else:
            email, expires = await self._verify_token(token, denied)
            if len(self._verified) >= _MAX_CACHED_TOKENS:
                self._verified.clear()
            self._verified[token] = (email, expires)
        if email not in self.allowed:
            raise PermissionDenied("the caller is not allowed to use this service")
        return email

    async def _verify_token(self, token: str, denied: Unauthenticated) -> tuple[str, float]:
        from google.auth import exceptions, jwt

        try:
            header = jwt.decode_header(token)  # type: ignore[no-untyped-call]
        except (ValueError, exceptions.GoogleAuthError):
            raise denied from None
        kid = header.get("kid") if isinstance(header, dict) else None
        certs = await self._certificates(kid if isinstance(kid, str) else None)
        try:
            claims = jwt.decode(  # type: ignore[no-untyped-call]
                token, certs=certs, audience=self.audience, clock_skew_in_seconds=30
            )
        except (ValueError, exceptions.GoogleAuthError):
            raise denied from None
        if claims.get("iss") not in ISSUERS:
            raise denied
        email = claims.get("email")
        if not isinstance(email, str) or claims.get("email_verified") is not True:
            raise denied
        return email.lower(), float(claims.get("exp", 0))


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Admits only verified, allowed callers to everything but health and reflection."""

    def __init__(self, verifier: IdTokenVerifier) -> None:
        self.verifier = verifier

    async def intercept_service(
        self,
        continuation: Callable[
            [grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any] | None]
        ],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = await continuation(handler_call_details)
        method: str = handler_call_details.method
        if handler is None or method.startswith(OPEN_PREFIXES):
            return handler
        authorization = None
        for key, value in handler_call_details.invocation_metadata or ():
            if key == "authorization" and isinstance(value, str):
                authorization = value
        try:
            await self.verifier.verify(authorization)
        except ServiceError as err:
            return _refusing(handler, err)
        return handler


def _refusing(
    handler: grpc.RpcMethodHandler[Any, Any], err: ServiceError
) -> grpc.RpcMethodHandler[Any, Any]:
    status = err.to_grpc_status()

    async def refuse(_request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        await context.abort(status.code, status.details, status.trailing_metadata)

    if handler.unary_unary is not None:
        return grpc.unary_unary_rpc_method_handler(
            refuse,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )
    if handler.stream_unary is not None:
        return grpc.stream_unary_rpc_method_handler(
            refuse,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )

    async def refuse_stream(_request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        await context.abort(status.code, status.details, status.trailing_metadata)
        yield  # pragma: no cover - makes this an async generator

    factory = (
        grpc.unary_stream_rpc_method_handler
        if handler.unary_stream is not None
        else grpc.stream_stream_rpc_method_handler
    )
    return factory(  # fail closed for any streaming method added later
        refuse_stream,
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )
