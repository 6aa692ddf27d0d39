"""Access tokens: verify a JWT into an :class:`Identity`, and mint HS256 dev tokens.

Which algorithm may verify a token is decided by the *key*, never by the token:
HS256 only with ``auth.hs256_secret``; RS256, ES256 and EdDSA only with public
keys from ``auth.public_key_files`` or ``auth.jwks_url``, each key with exactly
the one algorithm its type implies. So ``alg: none`` and the classic confusion
attack (HS256 "signed" with a public key as the secret) have no key to match.

HS256 signatures are checked here (HMAC-SHA256, compared in constant time: a fifth of
PyJWT's cost, and most connects carry one); PyJWT checks the asymmetric ones. The
claims (``aud``, ``iss`` and the time claims, against the injected clock so ``leeway``
and tests behave the same way) are checked here for every algorithm.
"""

from __future__ import annotations

import base64
import hmac
import json
import math
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import jwt
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from chatd.auth.jwks import ASYMMETRIC_ALGORITHMS, RemoteKeySet
from chatd.config import AuthConfig
from chatd.errors import ConfigError, InvalidField, TokenExpired, Unauthorized, Unavailable

USER_ID = re.compile(r"[A-Za-z0-9_.@:-]{1,64}")
_B64URL = re.compile(r"[A-Za-z0-9_-]*={0,2}")
MAX_TOKEN_CHARS = 8192
MIN_RSA_BITS = 2048


@dataclass(frozen=True)
class Identity:
    """Who a verified token speaks for."""

    user_id: str  # the `sub` claim
    expires_at: float  # unix seconds (the `exp` claim)
    claims: dict[str, Any]


class TokenVerifier:
    """Verifies access tokens against the keys named in :class:`AuthConfig`."""

    def __init__(self, config: AuthConfig, *, clock: Callable[[], float] = time.time) -> None:
        """Load the PEM public keys now, so a bad file stops chatd at start-up.

        Raises :class:`ConfigError` naming each unreadable or unsupported key file,
        or when no key source is configured at all.
        """
        self._config = config
        self._clock = clock
        self._file_keys: list[tuple[str, Any]] = _load_key_files(config.public_key_files)
        self._jwks = (
            RemoteKeySet(config.jwks_url, timeout=config.jwks_timeout, cache_seconds=config.jwks_cache_seconds)
            if config.jwks_url
            else None
        )
        self._algorithms = {alg for alg, _ in self._file_keys}
        if self._jwks is not None:
            self._algorithms |= ASYMMETRIC_ALGORITHMS
        self._hs256_key = config.hs256_secret.encode()
        if config.hs256_secret:
            self._algorithms.add("HS256")
        if not self._algorithms:
            raise ConfigError(["[auth] needs at least one of hs256_secret, public_key_files, jwks_url"])
        self._closed = False

    async def verify(self, token: str) -> Identity:
        """Check ``token``'s signature and claims and return whom it identifies.

        Raises :class:`TokenExpired` (``details["expired_at"]``) for a correctly
        signed token past ``exp`` + leeway; :class:`Unauthorized` for anything
        else wrong with the token (malformed, algorithm not allowed, unknown
        ``kid``, bad signature, wrong ``aud``/``iss``, missing or invalid
        ``sub``/``exp``, not yet valid); :class:`Unavailable` when the token needs
        JWKS keys and none could ever be fetched, or after :meth:`aclose`.
        Messages never include key material. Safe to cancel: at most a JWKS
        fetch is abandoned, and the key cache stays as it was.
        """
        if self._closed:
            raise Unavailable("token verifier is closed")
        if not isinstance(token, str) or len(token) > MAX_TOKEN_CHARS:
            raise Unauthorized("malformed token")
        signing_input, header, payload, signature = _segments(token)
        alg, kid = header.get("alg"), header.get("kid")
        if kid is not None and not isinstance(kid, str):
            raise Unauthorized("malformed token header (kid)")
        if alg not in self._algorithms:
            shown = alg if isinstance(alg, str) and len(alg) <= 16 else "?"
            raise Unauthorized(f"token algorithm {shown!r} is not allowed")
        if alg == "HS256":
            claims = self._hs256_claims(signing_input, payload, signature)
        else:
            claims = await self._verified_claims(token, alg, kid)
        self._check_audience_and_issuer(claims)
        return self._identity(claims)

    async def aclose(self) -> None:
        """Forget cached keys; later ``verify`` calls raise Unavailable. Idempotent, cancel-safe."""
        self._closed = True
        if self._jwks is not None:
            self._jwks.forget()

    def _hs256_claims(self, signing_input: str, payload: str, signature: str) -> dict[str, Any]:
        claims, given = _json_object(payload), _b64url(signature)  # malformed before forged, as PyJWT
        if claims is None:
            raise Unauthorized("malformed token")
        expected = hmac.digest(self._hs256_key, signing_input.encode("ascii"), "sha256")
        if not hmac.compare_digest(expected, given):
            raise Unauthorized("token signature is invalid")
        return claims

    async def _verified_claims(self, token: str, alg: str, kid: str | None) -> dict[str, Any]:
        # PEM keys carry no kid, so each one of the right type is tried
        keys = [key for key_alg, key in self._file_keys if key_alg == alg]
        for key in keys:
            if (claims := self._decode(token, alg, key)) is not None:
                return claims
        if self._jwks is not None and alg in ASYMMETRIC_ALGORITHMS:
            remote = await self._jwks.keys_for(kid)
            matching = [jwk.key for jwk in remote if jwk.algorithm_name == alg]
            for key in matching:
                if (claims := self._decode(token, alg, key)) is not None:
                    return claims
            if kid is not None and not keys and not matching:
                raise Unauthorized(
                    f"token algorithm {alg!r} does not match its key" if remote else "token key id (kid) is unknown"
                )
            keys += matching
        if not keys:
            raise Unauthorized(f"no key verifies {alg} tokens")
        raise Unauthorized("token signature is invalid")

    def _decode(self, token: str, alg: str, key: Any) -> dict[str, Any] | None:
        """The verified claims, or None if ``key`` did not make this signature."""
        options = {  # PyJWT checks the signature only: the claims are checked here
            "verify_exp": False, "verify_nbf": False, "verify_iat": False,
            "verify_aud": False, "verify_iss": False, "verify_sub": False,
        }
        try:
            return jwt.decode(token, key, algorithms=[alg], options=options)  # type: ignore[arg-type]
        except jwt.InvalidSignatureError:
            return None
        except jwt.PyJWTError:
            # Includes DecodeError and key errors; PyJWT's text is not shown, it may quote keys.
            raise Unauthorized("malformed token") from None

    def _check_audience_and_issuer(self, claims: dict[str, Any]) -> None:
        audience, issuer = self._config.audience, self._config.issuer
        if audience:
            if "aud" not in claims:
                raise Unauthorized("token has no aud claim")
            accepted = claims["aud"]
            if isinstance(accepted, str):
                accepted = [accepted]
            if not isinstance(accepted, list) or not all(isinstance(a, str) for a in accepted) or audience not in accepted:
                raise Unauthorized("token audience (aud) is not accepted")
        if issuer:
            if "iss" not in claims:
                raise Unauthorized("token has no iss claim")
            if claims["iss"] != issuer:
                raise Unauthorized("token issuer (iss) is not accepted")

    def _identity(self, claims: dict[str, Any]) -> Identity:
        now, leeway = self._clock(), self._config.leeway
        exp = _number_claim(claims, "exp")
        if exp is None:
            raise Unauthorized("token has no exp claim")
        if exp <= now - leeway:
            raise TokenExpired("token expired", expired_at=exp)
        for name in ("nbf", "iat"):
            value = _number_claim(claims, name)
            if value is not None and value > now + leeway:
                raise Unauthorized(f"token is not valid yet ({name} is in the future)")
        sub = claims.get("sub")
        if sub is None:
            raise Unauthorized("token has no sub claim")
        if not isinstance(sub, str) or not USER_ID.fullmatch(sub):
            raise Unauthorized("token sub claim is not a valid user id")
        return Identity(user_id=sub, expires_at=float(exp), claims=claims)


def _segments(token: str) -> tuple[str, dict[str, Any], str, str]:
    """(signing input, header, payload segment, signature segment) of a compact JWS."""
    signing_input, _, signature = token.rpartition(".")
    header_segment, dot, payload = signing_input.partition(".")
    header = _json_object(header_segment) if dot and "." not in payload else None
    if header is None:
        raise Unauthorized("malformed token")
    return signing_input, header, payload, signature


def _b64url(segment: str) -> bytes:
    """base64url (RFC 7515 §2); its alphabet only, padding tolerated as PyJWT did."""
    if not _B64URL.fullmatch(segment):
        raise Unauthorized("malformed token")
    try:
        return base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))
    except ValueError:  # binascii.Error: a length no encoding has
        raise Unauthorized("malformed token") from None


def _json_object(segment: str) -> dict[str, Any] | None:
    try:
        value = json.loads(_b64url(segment))
    except ValueError:  # JSONDecodeError, UnicodeDecodeError
        return None
    return value if isinstance(value, dict) else None


def _number_claim(claims: dict[str, Any], name: str) -> float | None:
    value = claims.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise Unauthorized(f"token {name} claim is not a number")
    return value


def _load_key_files(paths: list[str]) -> list[tuple[str, Any]]:
    keys, problems = [], []
    for path in paths:
        try:
            keys.append(_load_key_file(Path(path)))
        except ValueError as exc:
            problems.append(f"auth.public_key_files: {path}: {exc}")
    if problems:
        raise ConfigError(problems)
    return keys


def _load_key_file(path: Path) -> tuple[str, Any]:
    """(algorithm, public key) for one PEM file; ValueError says what is wrong (never the content)."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ValueError(f"cannot read: {exc.strerror or exc}") from None
    try:
        if b"-----BEGIN CERTIFICATE-----" in data:
            key = x509.load_pem_x509_certificate(data).public_key()
        else:
            key = serialization.load_pem_public_key(data)
    except ValueError:
        raise ValueError("not a PEM public key or certificate") from None
    if isinstance(key, rsa.RSAPublicKey):
        if key.key_size < MIN_RSA_BITS:
            raise ValueError(f"RSA key has {key.key_size} bits, at least {MIN_RSA_BITS} required")
        return "RS256", key
    if isinstance(key, ec.EllipticCurvePublicKey) and isinstance(key.curve, ec.SECP256R1):
        return "ES256", key
    if isinstance(key, ed25519.Ed25519PublicKey):
        return "EdDSA", key
    raise ValueError("unsupported key type (use RSA, EC P-256 or Ed25519)")


def mint(
    secret: str,
    user_id: str,
    *,
    ttl: float,
    audience: str = "",
    issuer: str = "",
    now: float | None = None,
    extra: dict[str, Any] | None = None,
) -> str:
    """An HS256 token for ``user_id`` valid for ``ttl`` seconds from ``now`` (default: the time now).

    ``extra`` claims are added first, so they cannot override sub/iat/exp/aud/iss.
    Raises :class:`InvalidField` for an empty secret, a user id that
    :meth:`TokenVerifier.verify` would reject, or a ttl that is not positive.
    Synchronous; no I/O.
    """
    if not secret:
        raise InvalidField("an HS256 secret is required to mint tokens", field="secret")
    if not USER_ID.fullmatch(user_id):
        raise InvalidField("user id must be 1-64 of A-Z a-z 0-9 _ . @ : -", field="user_id")
    if not ttl > 0:
        raise InvalidField("ttl must be positive", field="ttl")
    issued = time.time() if now is None else now
    # exp rounds up: the token is valid for at least ``ttl`` seconds, also for a ttl of 1.
    claims: dict[str, Any] = {**(extra or {}), "sub": user_id, "iat": int(issued), "exp": math.ceil(issued + ttl)}
    if audience:
        claims["aud"] = audience
    if issuer:
        claims["iss"] = issuer
    return jwt.encode(claims, secret, algorithm="HS256")
