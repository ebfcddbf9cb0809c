"""Optional caller authentication: Google-signed ID tokens, checked in the service.

Cloud Run IAM (roles/run.invoker) is the front door; this is defense in depth.
With TASKSERVICE_AUTH=google-id-token every TaskService call must carry
exactly one `authorization: Bearer <ID token>` header (the scheme in any
case, RFC 6750) whose signature (Google's published certificates), expiry,
not-before time, issuer and audience (TASKSERVICE_AUDIENCE) verify, and whose
verified email is on TASKSERVICE_ALLOWED_CALLERS. Missing, repeated or invalid
credentials: UNAUTHENTICATED; valid but not allowed: PERMISSION_DENIED; the
messages say no more than the code. Health and reflection stay open for
probes (the call pipeline bounds them apart from TaskService calls).

Certificates are fetched off the event loop, in a thread of the verifier's
own, by one fetch at a time that every waiting caller shares; a fetch that
has not finished in _FETCH_TIMEOUT seconds (a hanging endpoint, a slow DNS
answer) has failed. Each caller waits at most until its own deadline, and at
most limits.MAX_AUTH_WAITING callers wait at all: beyond them a call is refused at
once, so a flood of tokens during a hanging fetch holds no more memory than
that. A fetch that fails, or callers beyond the bound, get UNAVAILABLE
(AUTH_UNAVAILABLE); only a caller whose own deadline passes first gets
DEADLINE_EXCEEDED. Certificates are cached for their max-age and refetched (at
most every 30 s) when a token names an unknown key. A failed fetch is not
repeated for a growing pause (1 s, doubling to 60 s), during which callers get
UNAVAILABLE at once. Verified tokens are cached until they expire, so a
caller's repeated calls cost one dictionary look-up.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import threading
import time
import urllib.request
from collections.abc import Callable, Iterable, Sequence

from taskservice.config import GOOGLE_CERTS_URL
from taskservice.domain.errors import (
    DeadlineExceeded,
    PermissionDenied,
    Unauthenticated,
    Unavailable,
)
from taskservice.domain.limits import MAX_AUTH_WAITING

# The logger keeps the name log queries know, whichever module logs.
log = logging.getLogger("taskservice.auth")

ISSUERS = frozenset({"accounts.google.com", "https://accounts.google.com"})
_MAX_CACHED_TOKENS = 4096
_REFETCH_INTERVAL = 30.0
_FETCH_TIMEOUT = 5.0  # a whole fetch: connect, each read, and the rest
_RETRY_FIRST = 1.0
_RETRY_MAX = 60.0
_CLOCK_SKEW = 30
_MAX_AGE = re.compile(r"max-age=(\d+)")


def _fetch_certs(url: str) -> tuple[dict[str, str], float]:
    with urllib.request.urlopen(url, timeout=_FETCH_TIMEOUT) as response:
        certs = json.loads(response.read())
        match = _MAX_AGE.search(response.headers.get("Cache-Control", ""))
    max_age = float(match.group(1)) if match else 300.0
    if not isinstance(certs, dict):
        raise ValueError("certificate document is not an object")
    return {str(k): str(v) for k, v in certs.items()}, max_age


def _denied() -> Unauthenticated:
    return Unauthenticated("missing or invalid credentials")


class IdTokenVerifier:
    """Verifies Google ID tokens for one audience and a set of allowed emails."""

    def __init__(
        self,
        audience: str,
        allowed_callers: Iterable[str],
        certs_url: str = GOOGLE_CERTS_URL,
        clock: Callable[[], float] = time.time,
        max_waiting: int = MAX_AUTH_WAITING,
    ) -> None:
        self.audience = audience
        self.allowed = frozenset(e.strip().lower() for e in allowed_callers if e.strip())
        self.certs_url = certs_url
        self._clock = clock
        self._certs: dict[str, str] = {}
        self._certs_expire = 0.0
        self._last_fetch = -_REFETCH_INTERVAL
        self._fetch: asyncio.Task[None] | None = None
        self._retry_at = 0.0  # no fetch before this (after a failure)
        self._retry_pause = _RETRY_FIRST
        self._verified: dict[str, tuple[str, float]] = {}  # token -> (email, exp)
        self.max_waiting = max_waiting
        self.waiting = 0  # callers waiting for a fetch now
        # The thread of the latest fetch: while one given up on still runs, no
        # other starts (a daemon thread, so that it never holds the exit).
        self._fetcher: threading.Thread | None = None

    def _unavailable(self, why: str = "cannot verify credentials right now") -> Unavailable:
        return Unavailable(f"{why}; retry", reason="AUTH_UNAVAILABLE")

    async def _fetch_in_thread(self) -> tuple[dict[str, str], float]:
        if self._fetcher is not None and self._fetcher.is_alive():
            raise TimeoutError("the previous fetch has not finished")
        loop = asyncio.get_running_loop()
        result: asyncio.Future[tuple[dict[str, str], float]] = loop.create_future()

        def settle(value: tuple[dict[str, str], float] | None, error: Exception | None) -> None:
            if result.done():
                return
            if error is not None:
                result.set_exception(error)
            else:
                assert value is not None
                result.set_result(value)

        def work() -> None:
            value: tuple[dict[str, str], float] | None = None
            error: Exception | None = None
            try:
                value = _fetch_certs(self.certs_url)
            except Exception as exc:
                error = exc
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
                loop.call_soon_threadsafe(settle, value, error)

        self._fetcher = threading.Thread(target=work, name="certificates", daemon=True)
        self._fetcher.start()
        async with asyncio.timeout(_FETCH_TIMEOUT):
            return await result

    async def _refresh(self) -> None:
        try:
            certs, max_age = await self._fetch_in_thread()
        except Exception as exc:
            self._retry_at = self._clock() + self._retry_pause
            log.warning(
                "cannot fetch token certificates (%s); next try in %.0f s", exc, self._retry_pause
            )
            self._retry_pause = min(self._retry_pause * 2, _RETRY_MAX)
            raise
        self._certs = certs
        self._last_fetch = self._clock()
        self._certs_expire = self._last_fetch + max_age
        self._retry_pause = _RETRY_FIRST

    async def _certificates(self, kid: str | None, timeout: float) -> dict[str, str]:
        now = self._clock()
        stale = now >= self._certs_expire
        unknown = kid is not None and kid not in self._certs
        if not stale and not (unknown and now - self._last_fetch >= _REFETCH_INTERVAL):
            return self._certs
        if now < self._retry_at:  # a recent fetch failed: do not hammer the endpoint
            if self._certs:
                return self._certs
            raise self._unavailable()
        if self.waiting >= self.max_waiting:
            if self._certs:  # an unknown key id: answered from the certificates held
                return self._certs
            raise self._unavailable("too many calls are waiting for credentials to be checked")
        if self._fetch is None or self._fetch.done():
            self._fetch = asyncio.create_task(self._refresh())
            self._fetch.add_done_callback(lambda t: t.cancelled() or t.exception())
        fetch = self._fetch
        self.waiting += 1
        try:
            done, _ = await asyncio.wait((fetch,), timeout=timeout)
        finally:
            self.waiting -= 1
        if not done:  # the caller's own deadline (the fetch itself is bounded)
            raise DeadlineExceeded("the call ran out of time verifying credentials")
        if fetch.cancelled() or fetch.exception() is not None:
            if self._certs:
                return self._certs
            raise self._unavailable()
        return self._certs

    async def verify(self, authorizations: Sequence[str], timeout: float) -> str:
        """The caller's email, from the call's `authorization` header values;
        raises Unauthenticated or PermissionDenied. Waits at most `timeout`
        seconds for certificates."""
        if len(authorizations) != 1:
            raise _denied()  # none, or two: never guess which one counts
        scheme, _, token = authorizations[0].strip().partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise _denied()
        cached = self._verified.get(token)
        if cached is not None and cached[1] > self._clock():
            email = cached[0]
        else:
            email, expires = await self._verify_token(token, timeout)
            if len(self._verified) >= _MAX_CACHED_TOKENS:
                self._verified.clear()
            self._verified[token] = (email, expires)
        if email not in self.allowed:
            raise PermissionDenied("the caller is not allowed to use this service")
        return email

    async def _verify_token(self, token: str, timeout: float) -> tuple[str, float]:
        from google.auth import exceptions, jwt

        try:
            header = jwt.decode_header(token)  # type: ignore[no-untyped-call]
        except (ValueError, exceptions.GoogleAuthError):
            raise _denied() from None
        kid = header.get("kid") if isinstance(header, dict) else None
        certs = await self._certificates(kid if isinstance(kid, str) else None, timeout)
        try:
            claims = jwt.decode(  # type: ignore[no-untyped-call]
                token, certs=certs, audience=self.audience, clock_skew_in_seconds=_CLOCK_SKEW
            )
        except (ValueError, exceptions.GoogleAuthError):
            raise _denied() from None
        if claims.get("iss") not in ISSUERS:
            raise _denied()
        not_before = claims.get("nbf")
        if not_before is not None and (
            not isinstance(not_before, int | float) or not_before > self._clock() + _CLOCK_SKEW
        ):
            raise _denied()
        email = claims.get("email")
        if not isinstance(email, str) or claims.get("email_verified") is not True:
            raise _denied()
        return email.lower(), float(claims.get("exp", 0))
