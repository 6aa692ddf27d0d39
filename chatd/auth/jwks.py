"""The signing keys an identity provider publishes at a JWKS URL.

:class:`RemoteKeySet` fetches the document with a small h11 GET client (no
redirects beyond three, 1 MiB cap, one ``fail_after`` deadline for the whole
exchange), caches it, and refetches when the cache expires or a token names a
``kid`` it does not know. Every fetch attempt is at least ``REFETCH_INTERVAL``
after the previous completed one *unless the cache has simply expired*, so a
flood of made-up ``kid``s or a provider outage costs the provider one request per
interval, not one per token.
"""

from __future__ import annotations

import json
import math
import ssl
from typing import Callable
from urllib.parse import urljoin, urlsplit

import h11
import jwt
import trio

from chatd import log
from chatd.errors import Unavailable

REFETCH_INTERVAL = 10.0  # seconds between fetches caused by unknown kids or failures
MAX_BODY_BYTES = 1024 * 1024
MAX_REDIRECTS = 3
# Only asymmetric algorithms: a JWKS "oct" key would let anyone holding the
# document mint tokens, and HS256 must never be verified with a public key.
ASYMMETRIC_ALGORITHMS = frozenset({"RS256", "ES256", "EdDSA"})

_log = log.get("chatd.auth")


class FetchError(Exception):
    """The JWKS document could not be fetched or parsed (internal; never leaves this package)."""


class RemoteKeySet:
    """Cached keys from one JWKS URL. Uses ``trio.current_time()`` for ages.

    Concurrent callers share one fetch: they queue on a lock and, once they hold
    it, find the keys fresh and do not fetch again.
    """

    def __init__(self, url: str, *, timeout: float, cache_seconds: float) -> None:
        self.url = url
        self._timeout = timeout
        self._cache_seconds = cache_seconds
        self._keys: list[jwt.PyJWK] = []
        self._fetched_at = -math.inf  # last successful fetch
        self._tried_at = -math.inf  # last completed attempt, successful or not
        self._last_failed = False
        self._lock = trio.Lock()

    async def keys_for(self, kid: str | None) -> list[jwt.PyJWK]:
        """Keys that may have signed a token whose header names ``kid`` (all keys if None).

        Fetches when the cache is empty or expired, and once more per
        ``REFETCH_INTERVAL`` when ``kid`` is unknown. Returns ``[]`` when no
        cached key matches. Raises :class:`Unavailable` when no keys were ever
        fetched and the provider cannot be reached now. Safe to cancel: a
        cancelled fetch leaves the previous cache in place.
        """
        await self._refresh_if(self._stale)
        if kid is not None and not self._match(kid):
            await self._refresh_if(self._may_refetch)
        if not self._keys:
            retry_after = max(1.0, self._tried_at + REFETCH_INTERVAL - trio.current_time())
            raise Unavailable("token keys unavailable", retry_after=round(retry_after, 1))
        return self._match(kid) if kid is not None else list(self._keys)

    def forget(self) -> None:
        """Drop the cached keys (used when the verifier closes)."""
        self._keys = []
        self._fetched_at = -math.inf

    def _match(self, kid: str) -> list[jwt.PyJWK]:
        return [key for key in self._keys if key.key_id == kid]

    def _stale(self) -> bool:
        now = trio.current_time()
        expired = not self._keys or now - self._fetched_at >= self._cache_seconds
        backing_off = self._last_failed and now - self._tried_at < REFETCH_INTERVAL
        return expired and not backing_off

    def _may_refetch(self) -> bool:
        return trio.current_time() - self._tried_at >= REFETCH_INTERVAL

    async def _refresh_if(self, needed: Callable[[], bool]) -> None:
        if not needed():
            return
        async with self._lock:
            if needed():  # re-check: another task may have fetched while we waited
                await self._refresh()

    async def _refresh(self) -> None:
        try:
            with trio.fail_after(self._timeout):
                document = await fetch_json(self.url)
            keys = _parse_key_set(document)
        except (FetchError, trio.TooSlowError) as exc:
            reason = str(exc) if isinstance(exc, FetchError) else f"no answer within {self._timeout}s"
            self._tried_at, self._last_failed = trio.current_time(), True
            _log.warning(
                "auth.jwks_fetch_failed", url=self.url, error=reason, cached_keys=len(self._keys),
                using_cache=bool(self._keys),
            )
            return
        self._keys = keys
        self._fetched_at = self._tried_at = trio.current_time()
        self._last_failed = False
        _log.info("auth.jwks_fetched", url=self.url, keys=len(keys))


def _parse_key_set(document: object) -> list[jwt.PyJWK]:
    if not isinstance(document, dict) or not isinstance(document.get("keys"), list):
        raise FetchError('JWKS document has no "keys" list')
    keys = []
    for entry in document["keys"]:
        if not isinstance(entry, dict) or entry.get("use", "sig") != "sig":
            continue
        try:
            key = jwt.PyJWK(entry)
        except jwt.PyJWTError:
            continue  # unsupported key types are skipped, as PyJWKSet does
        if key.algorithm_name in ASYMMETRIC_ALGORITHMS:
            keys.append(key)
    if not keys:
        raise FetchError("JWKS document has no usable RS256/ES256/EdDSA signing keys")
    return keys


async def fetch_json(url: str) -> object:
    """GET ``url`` over HTTP/1.1 and parse its JSON body.

    Follows at most ``MAX_REDIRECTS`` redirects (never https -> http). Raises
    :class:`FetchError` for network errors, a non-200 status, a body over
    ``MAX_BODY_BYTES`` or invalid JSON. Has no deadline of its own: call it
    inside ``trio.fail_after``. Safe to cancel (the connection is closed).
    """
    for _ in range(MAX_REDIRECTS + 1):
        status, location, body = await _get(url)
        if status in (301, 302, 303, 307, 308) and location:
            target = urljoin(url, location)
            if urlsplit(url).scheme == "https" and urlsplit(target).scheme != "https":
                raise FetchError("JWKS redirect from https to plain http refused")
            url = target
            continue
        if status != 200:
            raise FetchError(f"JWKS URL answered HTTP {status}")
        try:
            return json.loads(body)
        except ValueError:
            raise FetchError("JWKS document is not valid JSON") from None
    raise FetchError(f"JWKS URL redirected more than {MAX_REDIRECTS} times")


async def _get(url: str) -> tuple[int, str, bytes]:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise FetchError(f"JWKS URL must be http:// or https://, got {parts.scheme or 'no'} scheme")
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        raise FetchError("JWKS URL has an invalid port") from None
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    try:
        if parts.scheme == "https":
            context = ssl.create_default_context()
            stream = await trio.open_ssl_over_tcp_stream(parts.hostname, port, ssl_context=context)
        else:
            stream = await trio.open_tcp_stream(parts.hostname, port)
        async with stream:
            return await _exchange(stream, parts.netloc.rpartition("@")[2], target)
    except (OSError, trio.BrokenResourceError, h11.ProtocolError) as exc:
        cause = exc.__cause__ or exc  # trio wraps ssl.SSLError in BrokenResourceError
        raise FetchError(f"JWKS fetch failed: {type(cause).__name__}: {cause}") from None


async def _exchange(stream: trio.abc.Stream, host: str, target: str) -> tuple[int, str, bytes]:
    conn = h11.Connection(h11.CLIENT)
    headers = [("Host", host), ("Accept", "application/json"), ("User-Agent", "chatd"), ("Connection", "close")]
    await stream.send_all(conn.send(h11.Request(method="GET", target=target, headers=headers)))
    await stream.send_all(conn.send(h11.EndOfMessage()))
    status, location, body = 0, "", bytearray()
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            conn.receive_data(await stream.receive_some(65536))
        elif isinstance(event, h11.Response):
            status = event.status_code
            for name, value in event.headers:
                if name == b"location":
                    location = value.decode("latin-1")
                elif name == b"content-length" and int(value) > MAX_BODY_BYTES:
                    raise FetchError(f"JWKS document is larger than {MAX_BODY_BYTES} bytes")
        elif isinstance(event, h11.Data):
            body += event.data
            if len(body) > MAX_BODY_BYTES:
                raise FetchError(f"JWKS document is larger than {MAX_BODY_BYTES} bytes")
        elif isinstance(event, h11.EndOfMessage):
            return status, location, bytes(body)
        elif isinstance(event, h11.ConnectionClosed):
            raise FetchError("JWKS server closed the connection before answering")
