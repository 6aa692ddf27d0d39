"""Access-token verification: HS256, PEM public keys, and a real JWKS provider process.

The JWKS provider is a small ``http.server`` in a child process on 127.0.0.1 (port 0),
serving ``jwks.json`` from a directory the test rewrites and appending each request
path to ``requests.log`` before it answers, so the log counts the fetches chatd made.
Tests that need cache ages or the 10 s refetch limit run on a MockClock at real speed
and ``jump()`` over the waits.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import math
import subprocess
import sys
import datetime
import ipaddress
from pathlib import Path

import jwt
import pytest
import trio
import trio.testing
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm
from structlog.testing import capture_logs

from chatd.auth.jwks import REFETCH_INTERVAL
from chatd.auth.tokens import Identity, TokenVerifier, mint
from chatd.config import AuthConfig
from chatd.errors import ConfigError, InvalidField, TokenExpired, Unauthorized, Unavailable

SECRET = "test-secret-0123456789abcdef-0123456789"
NOW = 1_700_000_000.0


def fixed_clock(now: float = NOW):
    return lambda: now


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def hand_made(header: dict, claims: dict, sign=lambda signing_input: b"") -> str:
    signing_input = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(claims).encode())}"
    return f"{signing_input}.{b64(sign(signing_input.encode()))}"


def claims(sub="alice", exp=NOW + 600, **extra):
    return {"sub": sub, "exp": exp, "iat": NOW, **extra}


def hs_verifier(**auth) -> TokenVerifier:
    return TokenVerifier(AuthConfig(hs256_secret=SECRET, **auth), clock=fixed_clock())


async def rejected(verifier: TokenVerifier, token: str, match: str) -> Unauthorized:
    with pytest.raises(Unauthorized, match=match) as info:
        await verifier.verify(token)
    assert type(info.value) is Unauthorized, "a bad token must not be reported as expired"
    assert SECRET not in str(info.value.to_wire())
    return info.value


# --- HS256 -------------------------------------------------------------------------


async def test_hs256_valid_token_gives_identity():
    with trio.fail_after(5):
        token = mint(SECRET, "alice@example.org", ttl=600, now=NOW, extra={"role": "admin"})
        identity = await hs_verifier().verify(token)
    assert identity == Identity(
        user_id="alice@example.org",
        expires_at=NOW + 600,
        claims={"role": "admin", "sub": "alice@example.org", "iat": int(NOW), "exp": int(NOW + 600)},
    )


async def test_hs256_expired_token_says_when_it_expired():
    with trio.fail_after(5):
        token = mint(SECRET, "alice", ttl=60, now=NOW - 3600)
        with pytest.raises(TokenExpired) as info:
            await hs_verifier().verify(token)
    assert info.value.details == {"expired_at": int(NOW - 3600 + 60)}
    assert info.value.to_wire()["code"] == "token_expired"


async def test_wrong_secret_is_a_bad_signature_even_when_expired():
    with trio.fail_after(5):
        verifier = hs_verifier()
        await rejected(verifier, mint("another-secret-0123456789abcdef-xyz", "alice", ttl=600, now=NOW), "signature")
        # An expired forgery is still a forgery: expiry is only reported for genuine tokens.
        await rejected(verifier, mint("another-secret-0123456789abcdef-xyz", "alice", ttl=1, now=0), "signature")


@pytest.mark.parametrize(
    "token",
    ["", "garbage", "a.b.c", "a.b", "eyJhbGciOiJIUzI1NiJ9.!!!.xyz", "x" * 9000, hand_made({"typ": "JWT"}, claims())],
)
async def test_malformed_tokens_are_unauthorized(token):
    with trio.fail_after(5):
        error = await rejected(hs_verifier(), token, "malformed|not allowed")
    assert error.status == 401 and error.code == "unauthorized"


def hs256(signing_input: bytes, secret: str = SECRET) -> bytes:
    return hmac.new(secret.encode(), signing_input, hashlib.sha256).digest()


async def test_hs256_tokens_made_by_pyjwt_with_extra_header_fields_verify():
    with trio.fail_after(5):
        token = jwt.encode(claims(), SECRET, algorithm="HS256", headers={"kid": "k1", "cty": "x"})
        assert (await hs_verifier().verify(token)).user_id == "alice"
        made = hand_made({"alg": "HS256", "typ": "JWT"}, claims(sub="bob"), hs256)
        assert (await hs_verifier().verify(made)).user_id == "bob"


async def test_any_edit_of_a_signed_hs256_token_is_refused():
    with trio.fail_after(5):
        verifier = hs_verifier()
        good = hand_made({"alg": "HS256"}, claims(), hs256)
        header, payload, signature = good.split(".")
        other_payload = b64(json.dumps(claims(sub="mallory")).encode())
        await rejected(verifier, f"{header}.{other_payload}.{signature}", "signature is invalid")
        flipped = signature[:-2] + ("A" if signature[-2] != "A" else "B") + signature[-1]
        await rejected(verifier, f"{header}.{payload}.{flipped}", "signature is invalid")
        await rejected(verifier, f"{header}.{payload}.", "signature is invalid")
        await rejected(verifier, f"{header}.{payload}.{signature}x", "malformed|signature is invalid")
        standard_alphabet = signature.replace("-", "+").replace("_", "/")
        for junk in (f"{header}.{payload}.{signature}=!", f"{header}.{payload}+.{signature}", f"{header}.{payload}.{signature}.{signature}",
                     f"{header}.{payload}.é{signature}", f" {good}", f"{header}.{payload}.{standard_alphabet}+/"):
            await rejected(verifier, junk, "malformed")
        assert (await verifier.verify(good)).user_id == "alice"


async def test_hs256_payload_must_be_a_json_object_even_when_signed():
    with trio.fail_after(5):
        header = b64(json.dumps({"alg": "HS256"}).encode())
        for body in (b"[1, 2]", b"not json", b"\xff\xfe"):
            signing_input = f"{header}.{b64(body)}"
            token = f"{signing_input}.{b64(hs256(signing_input.encode()))}"
            await rejected(hs_verifier(), token, "malformed")


@pytest.mark.parametrize("aud", [42, {"chatd": 1}, ["other"], [], None, ["chatd", 7]])
async def test_audience_claims_of_other_shapes_are_not_accepted(aud):
    with trio.fail_after(5):
        token = hand_made({"alg": "HS256"}, claims(aud=aud), hs256)
        await rejected(hs_verifier(audience="chatd"), token, "audience")


async def test_alg_none_is_never_accepted():
    with trio.fail_after(5):
        for alg in ("none", "None", "NONE"):
            await rejected(hs_verifier(), hand_made({"alg": alg, "typ": "JWT"}, claims()), "not allowed")


async def test_unlisted_hmac_algorithms_are_refused():
    token = jwt.encode(claims(), SECRET * 2, algorithm="HS512")
    with trio.fail_after(5):
        await rejected(hs_verifier(), token, "'HS512' is not allowed")


@pytest.mark.parametrize(
    ("payload", "match"),
    [
        ({"exp": NOW + 600}, "no sub claim"),
        ({"sub": "alice"}, "no exp claim"),
        ({"sub": "alice", "exp": "tomorrow"}, "exp claim is not a number"),
        ({"sub": "alice", "exp": math.inf}, "exp claim is not a number"),
        ({"sub": "alice", "exp": True}, "exp claim is not a number"),
    ],
)
async def test_missing_or_invalid_sub_and_exp_are_rejected(payload, match):
    with trio.fail_after(5):
        await rejected(hs_verifier(), jwt.encode(payload, SECRET, algorithm="HS256"), match)


@pytest.mark.parametrize("sub", ["", "bob smith", "a" * 65, "alice\n", "ålice", "a/b", 42, ["alice"]])
async def test_sub_must_be_a_user_id(sub):
    with trio.fail_after(5):
        await rejected(hs_verifier(), jwt.encode(claims(sub=sub), SECRET, algorithm="HS256"), "not a valid user id")


async def test_longest_allowed_user_id_is_accepted():
    with trio.fail_after(5):
        identity = await hs_verifier().verify(mint(SECRET, "a.b_c-d@e:" + "x" * 54, ttl=60, now=NOW))
    assert len(identity.user_id) == 64


async def test_audience_and_issuer_are_required_when_configured():
    verifier = hs_verifier(audience="chatd", issuer="https://id.example")
    with trio.fail_after(5):
        ok = await verifier.verify(mint(SECRET, "alice", ttl=60, now=NOW, audience="chatd", issuer="https://id.example"))
        assert ok.user_id == "alice"
        listed = jwt.encode(claims(aud=["other", "chatd"], iss="https://id.example"), SECRET, algorithm="HS256")
        assert (await verifier.verify(listed)).user_id == "alice"
        await rejected(verifier, mint(SECRET, "alice", ttl=60, now=NOW, issuer="https://id.example"), "no aud claim")
        await rejected(verifier, mint(SECRET, "alice", ttl=60, now=NOW, audience="chatd"), "no iss claim")
        await rejected(
            verifier, mint(SECRET, "alice", ttl=60, now=NOW, audience="other", issuer="https://id.example"), "audience"
        )
        await rejected(verifier, mint(SECRET, "alice", ttl=60, now=NOW, audience="chatd", issuer="https://evil"), "issuer")


async def test_audience_and_issuer_are_ignored_when_not_configured():
    token = mint(SECRET, "alice", ttl=60, now=NOW, audience="anything", issuer="anyone")
    with trio.fail_after(5):
        assert (await hs_verifier().verify(token)).claims["aud"] == "anything"


async def test_leeway_applies_to_exp_nbf_and_iat():
    verifier = hs_verifier(leeway=30)
    with trio.fail_after(5):
        assert await verifier.verify(mint(SECRET, "alice", ttl=600, now=NOW - 620))  # expired 20 s ago
        with pytest.raises(TokenExpired):
            await verifier.verify(mint(SECRET, "alice", ttl=600, now=NOW - 640))  # 40 s ago
        assert await verifier.verify(jwt.encode(claims(nbf=NOW + 20, iat=NOW + 20), SECRET, algorithm="HS256"))
        await rejected(verifier, jwt.encode(claims(nbf=NOW + 40), SECRET, algorithm="HS256"), "not valid yet .nbf")
        await rejected(verifier, jwt.encode(claims(iat=NOW + 40), SECRET, algorithm="HS256"), "not valid yet .iat")
        strict = hs_verifier(leeway=0)
        with pytest.raises(TokenExpired):
            await strict.verify(mint(SECRET, "alice", ttl=600, now=NOW - 601))


async def test_verify_after_aclose_is_unavailable():
    verifier = hs_verifier()
    await verifier.aclose()
    await verifier.aclose()
    with trio.fail_after(5), pytest.raises(Unavailable):
        await verifier.verify(mint(SECRET, "alice", ttl=60, now=NOW))


def test_mint_refuses_what_verify_would_reject():
    with pytest.raises(InvalidField):
        mint(SECRET, "bob smith", ttl=60)
    with pytest.raises(InvalidField):
        mint("", "alice", ttl=60)
    with pytest.raises(InvalidField):
        mint(SECRET, "alice", ttl=0)
    token = mint(SECRET, "alice", ttl=60, now=NOW, extra={"sub": "mallory", "exp": NOW + 10**9})
    payload = jwt.decode(token, SECRET, algorithms=["HS256"], options={"verify_exp": False, "verify_iat": False})
    assert (payload["sub"], payload["exp"]) == ("alice", int(NOW + 60))


# --- PEM public keys ---------------------------------------------------------------


def pem(public_key) -> bytes:
    return public_key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


@pytest.fixture(scope="module")
def keys():
    return {
        "RS256": rsa.generate_private_key(public_exponent=65537, key_size=2048),
        "RS256-other": rsa.generate_private_key(public_exponent=65537, key_size=2048),
        "ES256": ec.generate_private_key(ec.SECP256R1()),
        "EdDSA": ed25519.Ed25519PrivateKey.generate(),
    }


def key_file(tmp_path: Path, name: str, private_key) -> str:
    path = tmp_path / f"{name}.pem"
    path.write_bytes(pem(private_key.public_key()))
    return str(path)


@pytest.mark.parametrize("alg", ["RS256", "ES256", "EdDSA"])
async def test_pem_public_keys_verify_their_algorithm(tmp_path, keys, alg):
    files = [key_file(tmp_path, name, keys[name]) for name in ("RS256", "ES256", "EdDSA")]
    verifier = TokenVerifier(AuthConfig(public_key_files=files), clock=fixed_clock())
    with trio.fail_after(5):
        identity = await verifier.verify(jwt.encode(claims(sub="bob"), keys[alg], algorithm=alg))
        assert identity.user_id == "bob"
        with pytest.raises(TokenExpired):
            await verifier.verify(jwt.encode(claims(exp=NOW - 3600), keys[alg], algorithm=alg))
        await rejected(verifier, jwt.encode(claims(), SECRET, algorithm="HS256"), "'HS256' is not allowed")


async def test_token_from_an_unknown_private_key_is_rejected(tmp_path, keys):
    verifier = TokenVerifier(AuthConfig(public_key_files=[key_file(tmp_path, "rsa", keys["RS256"])]), clock=fixed_clock())
    forged = jwt.encode(claims(), keys["RS256-other"], algorithm="RS256")
    with trio.fail_after(5):
        await rejected(verifier, forged, "signature is invalid")
        await rejected(verifier, jwt.encode(claims(), keys["EdDSA"], algorithm="EdDSA"), "'EdDSA' is not allowed")


async def test_algorithm_confusion_with_public_key_as_hmac_secret_is_rejected(tmp_path, keys):
    public_pem = pem(keys["RS256"].public_key())
    path = key_file(tmp_path, "rsa", keys["RS256"])
    forged = hand_made(
        {"alg": "HS256", "typ": "JWT"}, claims(), lambda data: hmac.new(public_pem, data, hashlib.sha256).digest()
    )
    with trio.fail_after(5):
        only_public = TokenVerifier(AuthConfig(public_key_files=[path]), clock=fixed_clock())
        await rejected(only_public, forged, "'HS256' is not allowed")
        # With a real HS256 secret configured too, HS256 is checked against that secret only.
        both = TokenVerifier(AuthConfig(hs256_secret=SECRET, public_key_files=[path]), clock=fixed_clock())
        await rejected(both, forged, "signature is invalid")
        assert (await both.verify(jwt.encode(claims(), keys["RS256"], algorithm="RS256"))).user_id == "alice"


def test_bad_key_files_stop_construction_naming_each_file(tmp_path, keys):
    private = tmp_path / "private.pem"
    private.write_bytes(
        keys["RS256"].private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    (tmp_path / "garbage.pem").write_text("not a key")
    small = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    p384 = ec.generate_private_key(ec.SECP384R1())
    files = [
        str(tmp_path / "missing.pem"), str(private), str(tmp_path / "garbage.pem"),
        key_file(tmp_path, "small", small), key_file(tmp_path, "p384", p384),
    ]
    with pytest.raises(ConfigError) as info:
        TokenVerifier(AuthConfig(public_key_files=files))
    problems = info.value.problems
    assert len(problems) == 5
    for path, problem, reason in zip(files, problems, ["cannot read", "not a PEM", "not a PEM", "1024 bits", "unsupported"]):
        assert path in problem and reason in problem
    assert "PRIVATE KEY" not in str(info.value) and "not a key" not in str(info.value)


def test_no_key_source_is_a_config_error():
    with pytest.raises(ConfigError):
        TokenVerifier(AuthConfig())


# --- JWKS from a real provider process ---------------------------------------------

PROVIDER = r"""
import http.server, pathlib, sys, time
root = pathlib.Path(sys.argv[1])

class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        with open(root / "requests.log", "a") as log:
            log.write(self.path + "\n")
        delay_file = root / "delay"
        if delay_file.exists():
            time.sleep(float(delay_file.read_text()))
        if self.path == "/moved":
            self.send_response(302)
            self.send_header("Location", "/jwks.json")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        status_file = root / "status"
        status = int(status_file.read_text()) if status_file.exists() else 200
        body = (root / "jwks.json").read_bytes()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        if not (root / "no-length").exists():  # else the body ends when the connection does
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass

server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
if len(sys.argv) > 2:  # serve https with this certificate and key
    import ssl
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(sys.argv[2], sys.argv[3])
    server.socket = context.wrap_socket(server.socket, server_side=True)
print(server.server_address[1], flush=True)
server.serve_forever()
"""


class Provider:
    """A JWKS provider in a child process; ``publish`` rewrites what it serves."""

    def __init__(self, root: Path, tls: tuple[str, str] | None = None) -> None:
        self.root = root
        root.mkdir()
        self.tls = tls
        self.process: trio.Process | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}/jwks.json"

    def publish(
        self, *jwks: dict, raw: bytes | None = None, status: int = 200, length: bool = True, delay: float = 0
    ) -> None:
        body = raw if raw is not None else json.dumps({"keys": list(jwks)}).encode()
        (self.root / "jwks.json.tmp").write_bytes(body)
        (self.root / "jwks.json.tmp").replace(self.root / "jwks.json")
        (self.root / "status").write_text(str(status))
        (self.root / "no-length").unlink(missing_ok=True)
        if not length:
            (self.root / "no-length").touch()
        (self.root / "delay").write_text(str(delay))

    @property
    def requests(self) -> int:
        log = self.root / "requests.log"
        return len(log.read_text().splitlines()) if log.exists() else 0

    async def start(self) -> None:
        self.process = await trio.lowlevel.open_process(
            [sys.executable, "-c", PROVIDER, str(self.root), *(self.tls or ())], stdout=subprocess.PIPE
        )
        line = b""
        with trio.fail_after(10):
            while not line.endswith(b"\n"):
                chunk = await self.process.stdout.receive_some(64)
                assert chunk, "provider exited before printing its port"
                line += chunk
        self.port = int(line)

    async def stop(self) -> None:
        if self.process is not None and self.process.returncode is None:
            self.process.kill()  # SIGKILL to this child's pid
            with trio.move_on_after(5):
                await self.process.wait()
            await self.process.stdout.aclose()


@pytest.fixture
async def provider(tmp_path):
    provider = Provider(tmp_path / "provider")
    try:
        await provider.start()
        yield provider
    finally:
        await provider.stop()


@pytest.fixture
def clock():
    """Runs at real speed (sockets and processes work) but can jump over cache ages."""
    return trio.testing.MockClock(rate=1.0)


def jwk(private_key, kid: str, alg: str) -> dict:
    algorithm = {"RS256": RSAAlgorithm, "ES256": ECAlgorithm, "EdDSA": OKPAlgorithm}[alg]
    public = algorithm.to_jwk(private_key.public_key(), as_dict=True)
    return {**public, "kid": kid, "alg": alg, "use": "sig"}


def signed(private_key, alg: str, kid: str | None, sub: str = "alice") -> str:
    return jwt.encode(claims(sub=sub), private_key, algorithm=alg, headers={"kid": kid} if kid else None)


def jwks_verifier(url: str, **auth) -> TokenVerifier:
    settings = {"jwks_timeout": 2.0, "jwks_cache_seconds": 60.0, **auth}
    return TokenVerifier(AuthConfig(jwks_url=url, **settings), clock=fixed_clock())


async def test_jwks_keys_verify_and_are_cached(provider, keys, clock):
    provider.publish(jwk(keys["RS256"], "rsa1", "RS256"), jwk(keys["EdDSA"], "ed1", "EdDSA"))
    verifier = jwks_verifier(provider.url, jwks_cache_seconds=20)
    with trio.fail_after(60):  # the clock jumps count against this bound
        assert (await verifier.verify(signed(keys["RS256"], "RS256", "rsa1", "bob"))).user_id == "bob"
        assert (await verifier.verify(signed(keys["EdDSA"], "EdDSA", "ed1"))).user_id == "alice"
        assert (await verifier.verify(signed(keys["EdDSA"], "EdDSA", None))).user_id == "alice"  # no kid: try by alg
        assert provider.requests == 1
        clock.jump(19)
        await verifier.verify(signed(keys["RS256"], "RS256", "rsa1"))
        assert provider.requests == 1
        clock.jump(2)  # past jwks_cache_seconds
        await verifier.verify(signed(keys["RS256"], "RS256", "rsa1"))
        assert provider.requests == 2


async def test_concurrent_verifies_share_one_fetch(provider, keys):
    provider.publish(jwk(keys["ES256"], "ec1", "ES256"))
    verifier = jwks_verifier(provider.url)
    users: list[str] = []

    async def verify_one(n: int) -> None:
        users.append((await verifier.verify(signed(keys["ES256"], "ES256", "ec1", f"user{n}"))).user_id)

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            for n in range(20):
                nursery.start_soon(verify_one, n)
    assert sorted(users) == sorted(f"user{n}" for n in range(20))
    assert provider.requests == 1


async def test_key_rotation_is_picked_up_on_a_new_kid(provider, keys, clock):
    provider.publish(jwk(keys["RS256"], "2024", "RS256"))
    verifier = jwks_verifier(provider.url, jwks_cache_seconds=15)
    with trio.fail_after(60):  # the clock jumps count against this bound
        await verifier.verify(signed(keys["RS256"], "RS256", "2024"))
        provider.publish(jwk(keys["RS256"], "2024", "RS256"), jwk(keys["RS256-other"], "2025", "RS256"))
        clock.jump(REFETCH_INTERVAL + 1)
        assert (await verifier.verify(signed(keys["RS256-other"], "RS256", "2025", "carol"))).user_id == "carol"
        assert provider.requests == 2
        await verifier.verify(signed(keys["RS256"], "RS256", "2024"))  # the old key is still published
        await rejected(verifier, signed(keys["RS256"], "RS256", "2025"), "signature is invalid")
        assert provider.requests == 2
        provider.publish(jwk(keys["RS256-other"], "2025", "RS256"))  # 2024 retired
        clock.jump(16)  # past jwks_cache_seconds
        await verifier.verify(signed(keys["RS256-other"], "RS256", "2025"))
        assert provider.requests == 3
        await rejected(verifier, signed(keys["RS256"], "RS256", "2024"), "kid.* unknown")
        assert provider.requests == 3


async def test_unknown_kid_refetches_at_most_once_per_interval(provider, keys, clock):
    provider.publish(jwk(keys["RS256"], "known", "RS256"))
    verifier = jwks_verifier(provider.url, jwks_cache_seconds=3600)
    with trio.fail_after(60):
        await verifier.verify(signed(keys["RS256"], "RS256", "known"))
        await rejected(verifier, signed(keys["RS256"], "RS256", "bogus-0"), "kid.* unknown")
        assert provider.requests == 1, "a refetch right after a fetch must wait for the interval"
        clock.jump(REFETCH_INTERVAL + 1)
        for n in range(50):
            await rejected(verifier, signed(keys["RS256"], "RS256", f"bogus-{n}"), "kid.* unknown")
        assert provider.requests == 2
        clock.jump(REFETCH_INTERVAL + 1)
        await rejected(verifier, signed(keys["RS256"], "RS256", "bogus-x"), "kid.* unknown")
        assert provider.requests == 3
        assert (await verifier.verify(signed(keys["RS256"], "RS256", "known"))).user_id == "alice"
        assert provider.requests == 3


async def test_provider_down_with_cache_keeps_verifying(provider, keys, clock):
    provider.publish(jwk(keys["EdDSA"], "ed1", "EdDSA"))
    verifier = jwks_verifier(provider.url, jwks_cache_seconds=5)
    with trio.fail_after(30):
        await verifier.verify(signed(keys["EdDSA"], "EdDSA", "ed1"))
        await provider.stop()
        clock.jump(6)
        with capture_logs() as logs:
            assert (await verifier.verify(signed(keys["EdDSA"], "EdDSA", "ed1", "dave"))).user_id == "dave"
            assert (await verifier.verify(signed(keys["EdDSA"], "EdDSA", "ed1"))).user_id == "alice"
    warnings = [entry for entry in logs if entry["event"] == "auth.jwks_fetch_failed"]
    assert len(warnings) == 1, "a failed fetch is retried only after the refetch interval"
    assert warnings[0]["log_level"] == "warning" and warnings[0]["using_cache"] is True


async def test_provider_down_without_cache_is_unavailable(provider, keys):
    url = provider.url
    await provider.stop()
    verifier = jwks_verifier(url)
    with trio.fail_after(10):
        with pytest.raises(Unavailable, match="token keys unavailable") as info:
            await verifier.verify(signed(keys["RS256"], "RS256", "rsa1"))
    assert 1 <= info.value.retry_after <= REFETCH_INTERVAL
    assert info.value.status == 503


async def test_provider_that_never_answers_is_unavailable_within_the_timeout(keys):
    listener = trio.socket.socket()
    with listener:
        await listener.bind(("127.0.0.1", 0))
        listener.listen(8)  # connections complete in the backlog; nobody ever reads or answers
        port = listener.getsockname()[1]
        verifier = jwks_verifier(f"http://127.0.0.1:{port}/jwks.json", jwks_timeout=0.5)
        with trio.fail_after(5):
            started = trio.current_time()
            with pytest.raises(Unavailable):
                await verifier.verify(signed(keys["RS256"], "RS256", "rsa1"))
            elapsed = trio.current_time() - started
            assert 0.5 <= elapsed < 1.5
            started = trio.current_time()
            with pytest.raises(Unavailable):  # within the retry interval: fail fast, no second wait
                await verifier.verify(signed(keys["RS256"], "RS256", "rsa1"))
            assert trio.current_time() - started < 0.2


async def test_a_cancelled_fetch_does_not_count_as_a_failure(provider, keys):
    provider.publish(jwk(keys["RS256"], "rsa1", "RS256"), delay=3)
    verifier = jwks_verifier(provider.url, jwks_timeout=5)
    with trio.fail_after(10):
        with trio.move_on_after(0.3) as scope:  # the client hung up mid-fetch
            await verifier.verify(signed(keys["RS256"], "RS256", "rsa1"))
        assert scope.cancelled_caught and provider.requests == 1
        provider.publish(jwk(keys["RS256"], "rsa1", "RS256"))
        # No back-off was recorded for the cancelled fetch: the next verify fetches at once.
        assert (await verifier.verify(signed(keys["RS256"], "RS256", "rsa1"))).user_id == "alice"
        assert provider.requests == 2


def padded(key: dict) -> bytes:
    """A usable key set, but over the 1 MiB cap."""
    return json.dumps({"keys": [key], "pad": "x" * (1024 * 1024)}).encode()


@pytest.mark.parametrize(
    "document",
    [
        lambda key: {"status": 500},
        lambda key: {"raw": b"<html>not json</html>"},
        lambda key: {"raw": json.dumps({"key": [key]}).encode()},
        lambda key: {"raw": json.dumps({"keys": [{"kty": "oct", "k": b64(SECRET.encode()), "kid": "rsa1"}]}).encode()},
        lambda key: {"raw": json.dumps({"keys": [{**key, "use": "enc"}]}).encode()},
        lambda key: {"raw": padded(key)},
        lambda key: {"raw": padded(key), "length": False},
    ],
    ids=["http-500", "not-json", "no-keys-list", "only-symmetric-key", "only-encryption-key", "over-1MiB",
         "over-1MiB-no-length"],
)
async def test_unusable_jwks_documents_are_unavailable(provider, keys, document):
    provider.publish(**document(jwk(keys["RS256"], "rsa1", "RS256")))
    verifier = jwks_verifier(provider.url)
    with trio.fail_after(10), pytest.raises(Unavailable):
        await verifier.verify(signed(keys["RS256"], "RS256", "rsa1"))
    assert provider.requests == 1


async def test_jwks_redirect_is_followed_and_alg_must_match_key(provider, keys):
    provider.publish(jwk(keys["RS256"], "rsa1", "RS256"))
    verifier = jwks_verifier(provider.url.replace("/jwks.json", "/moved"))
    with trio.fail_after(10):
        assert (await verifier.verify(signed(keys["RS256"], "RS256", "rsa1"))).user_id == "alice"
        assert provider.requests == 2  # /moved, then /jwks.json
        # An ES256 token naming the RSA key's kid: the key decides the algorithm.
        await rejected(verifier, signed(keys["ES256"], "ES256", "rsa1"), "does not match its key")
        # HS256 "signed" with the published public key: no secret configured, so not allowed.
        public_pem = pem(keys["RS256"].public_key())
        forged = hand_made(
            {"alg": "HS256", "kid": "rsa1"}, claims(), lambda data: hmac.new(public_pem, data, hashlib.sha256).digest()
        )
        await rejected(verifier, forged, "'HS256' is not allowed")


def self_signed(tmp_path: Path) -> tuple[str, str]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(x509.oid.NameOID.COMMON_NAME, "127.0.0.1")])
    today = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(today - datetime.timedelta(days=1)).not_valid_after(today + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
        .sign(key, hashes.SHA256())
    )
    cert_file, key_file = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return str(cert_file), str(key_file)


async def test_https_provider_with_an_untrusted_certificate_is_refused(tmp_path, keys):
    provider = Provider(tmp_path / "tls-provider", tls=self_signed(tmp_path))
    try:
        await provider.start()
        provider.publish(jwk(keys["RS256"], "rsa1", "RS256"))
        verifier = jwks_verifier(provider.url)
        with trio.fail_after(10), capture_logs() as logs, pytest.raises(Unavailable):
            await verifier.verify(signed(keys["RS256"], "RS256", "rsa1"))
    finally:
        await provider.stop()
    assert provider.requests == 0, "no request may be sent over an unverified connection"
    assert "CERTIFICATE_VERIFY_FAILED" in logs[0]["error"]
