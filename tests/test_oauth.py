"""[oauth]: bearer JWTs of VAIC's OAuth mode, checked against a JWK Set (voicebridge/oauth.py).

Everything is local: RSA/EC keys generated here, a JWK Set served by a stdlib HTTP server on
127.0.0.1 (its own thread, so the fetch really goes over a socket), tokens signed here. Unit tests
drive `JwtValidator` directly; the end-to-end tests run the real daemon subprocess.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import threading
import time
import uuid
from contextlib import asynccontextmanager, contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, AsyncIterator, Iterator

import jwt
import msgspec
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

from tests.daemon_harness import TOKEN, running_daemon, running_fake
from tests.rawws import RawWs
from voicebridge.config import ConfigError, OAuthConfig, load_config
from voicebridge.oauth import MAX_JWKS_BYTES, MAX_TOKEN_BYTES, JwtValidator, fetch_jwks, parse_jwks
from voicebridge.sim.caller import CallerConfig, Silence, Speak, WaitForBot, run_call

ISSUER = "https://idp.example.test/"
AUDIENCE = "voicebridge-test"


# ------------------------------------------------------------------------------ keys and tokens
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def jwk_of(key: Any, kid: str, **extra: Any) -> dict[str, Any]:
    pub = key.public_key()
    algo = RSAAlgorithm if isinstance(pub, rsa.RSAPublicKey) else ECAlgorithm
    d = algo.to_jwk(pub, as_dict=True)
    return {**d, "kid": kid, "use": "sig", **extra}


def claims(**over: Any) -> dict[str, Any]:
    now = int(time.time())
    base: dict[str, Any] = {"iss": ISSUER, "aud": AUDIENCE, "sub": "vaic-client", "iat": now,
                            "exp": now + 600, "scope": "voicebridge"}
    base.update(over)
    return {k: v for k, v in base.items() if v is not None}


def sign(key: Any, kid: str | None, alg: str = "RS256", **over: Any) -> str:
    headers = {"kid": kid} if kid is not None else None
    return jwt.encode(claims(**over), key, algorithm=alg, headers=headers)


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def unsigned(alg: str, kid: str, **over: Any) -> str:
    """A token with header `alg` and an empty signature (alg=none)."""
    head = b64url(json.dumps({"alg": alg, "kid": kid, "typ": "JWT"}).encode())
    body = b64url(json.dumps(claims(**over)).encode())
    return f"{head}.{body}."


def hs256_with(secret: bytes, kid: str) -> str:
    """The classic confusion attack: HS256 keyed with the (public) RSA key's PEM."""
    head = b64url(json.dumps({"alg": "HS256", "kid": kid}).encode())
    body = b64url(json.dumps(claims()).encode())
    mac = hmac.new(secret, f"{head}.{body}".encode(), hashlib.sha256).digest()
    return f"{head}.{body}.{b64url(mac)}"


# ------------------------------------------------------------------------------ the JWKS server
class JwksServer:
    """A JWK Set over HTTP on 127.0.0.1. `keys`, `status`, `delay_s` and `raw` (a body to serve
    instead of the key set) can be changed while it runs; `hits` counts GETs."""

    def __init__(self, keys: list[dict[str, Any]] | None = None) -> None:
        self.keys = list(keys or [])
        self.status = 200
        self.delay_s = 0.0
        self.raw: bytes | None = None
        self.location: str | None = None    # set: answer `status` (a 3xx) with this Location
        self.hits = 0
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's name)
                outer.hits += 1
                if outer.delay_s:
                    time.sleep(outer.delay_s)
                body = outer.raw if outer.raw is not None else json.dumps({"keys": outer.keys}).encode()
                self.send_response(outer.status)
                if outer.location is not None:
                    self.send_header("Location", outer.location)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                try:
                    self.wfile.write(body)
                except OSError:
                    pass

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/.well-known/jwks.json"
        self._thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                        daemon=True)

    def __enter__(self) -> "JwksServer":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self._thread.join(5)


@contextmanager
def jwks_server(keys: list[dict[str, Any]] | None = None) -> Iterator[JwksServer]:
    with JwksServer(keys) as srv:
        yield srv


def oauth_cfg(url: str, **kw: Any) -> OAuthConfig:
    base: dict[str, Any] = dict(enabled=True, jwks_url=url, issuer=ISSUER, audience=AUDIENCE,
                                jwks_timeout_s=2.0)
    base.update(kw)
    return msgspec.convert(base, OAuthConfig)


@asynccontextmanager
async def started(cfg: OAuthConfig) -> AsyncIterator[JwtValidator]:
    """A validator with its first fetch done and its refresher running; closed afterwards."""
    v = JwtValidator(cfg)
    await v.start()
    try:
        yield v
    finally:
        await v.aclose()


async def eventually(pred: Any, timeout_s: float, step_s: float = 0.05) -> bool:
    end = time.monotonic() + timeout_s
    while True:
        if pred():
            return True
        if time.monotonic() >= end:
            return False
        await asyncio.sleep(step_s)


def bearer(token: str) -> bytes:
    return f"Bearer {token}".encode()


@pytest.fixture(scope="module")
def keys() -> dict[str, Any]:
    """Generated once per module (RSA generation costs CPU): the signing key, another RSA key,
    a P-256 key."""
    return {"a": rsa_key(), "b": rsa_key(), "ec": ec.generate_private_key(ec.SECP256R1())}


# ------------------------------------------------------------------------------ unit: check()
async def test_each_token_gets_its_reason(keys, logs):
    a, b = keys["a"], keys["b"]
    pem = a.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    now = int(time.time())
    cases = {
        "good": (sign(a, "k1"), None),
        "expired": (sign(a, "k1", exp=now - 120), "expired"),                   # beyond 30 s leeway
        "expired_within_leeway": (sign(a, "k1", exp=now - 5), None),
        "not_yet_valid": (sign(a, "k1", nbf=now + 300), "not_yet_valid"),
        "wrong_issuer": (sign(a, "k1", iss="https://evil.test/"), "wrong_issuer"),
        "wrong_audience": (sign(a, "k1", aud="someone-else"), "wrong_audience"),
        "no_exp": (sign(a, "k1", exp=None), "missing_claim"),
        "no_aud": (sign(a, "k1", aud=None), "missing_claim"),
        "other_key_same_kid": (sign(b, "k1"), "bad_signature"),
        "alg_none": (unsigned("none", "k1"), "bad_algorithm"),
        "hs256_with_public_pem": (hs256_with(pem, "k1"), "bad_algorithm"),
        "rs384_not_allowed": (sign(a, "k1", alg="RS384"), "bad_algorithm"),
        "garbage": ("not-a-jwt", "malformed"),
        "garbage_three_parts": ("a.b.c", "malformed"),
        "non_ascii": ("\u00e9.\u00e9.\u00e9", "malformed"),
        "oversized": (sign(a, "k1", pad="x" * MAX_TOKEN_BYTES), "oversized"),
    }
    with jwks_server([jwk_of(a, "k1")]) as srv:
        async with started(oauth_cfg(srv.url)) as v:
            assert v.kids == ["k1"]
            got = {name: v.check(bearer(tok)) for name, (tok, _) in cases.items()}
            assert got == {name: want for name, (_, want) in cases.items()}
            assert v.check(b"") == "missing"
            assert v.check(b"Basic " + cases["good"][0].encode()) == "malformed"
            assert v.check(b"bearer " + cases["good"][0].encode()) is None   # the scheme is case-insensitive
            assert v.check(b"Bearer ") == "malformed"
            assert v.fetches == 1   # none of these asked for a refresh
    # check() never logs: the only lines are the fetch's, and no signature appears anywhere
    assert {e["event"] for e in logs.events()} == {"oauth.jwks_loaded"}
    text = logs.getvalue()
    for tok, _ in cases.values():
        sig = tok.split(".")[-1]
        assert len(sig) < 16 or sig not in text


async def test_algorithm_and_key_type_must_agree(keys, logs):
    """ES256 configured next to RS256: an EC key verifies ES256; a token claiming ES256 for the
    RSA key's kid, or RS256 for a JWK whose own alg is RS512, is refused."""
    a, e = keys["a"], keys["ec"]
    jwks = [jwk_of(a, "rsa"), jwk_of(e, "ec"), jwk_of(keys["b"], "rs512-only", alg="RS512")]
    with jwks_server(jwks) as srv:
        async with started(oauth_cfg(srv.url, algorithms=["RS256", "ES256"])) as v:
            assert v.kids == ["ec", "rs512-only", "rsa"]
            assert v.check(bearer(sign(e, "ec", alg="ES256"))) is None
            assert v.check(bearer(sign(a, "rsa"))) is None
            assert v.check(bearer(sign(e, "rsa", alg="ES256"))) == "bad_algorithm"
            assert v.check(bearer(sign(keys["b"], "rs512-only"))) == "bad_algorithm"


async def test_token_without_kid_only_with_a_single_key(keys, logs):
    a, b = keys["a"], keys["b"]
    with jwks_server([jwk_of(a, "only")]) as srv:
        async with started(oauth_cfg(srv.url, jwks_min_refresh_s=60, jwks_refresh_s=600)) as v:
            assert v.check(bearer(sign(a, None))) is None
            srv.keys.append(jwk_of(b, "second"))
            assert await v.refresh("test")
            assert v.check(bearer(sign(a, None))) == "unknown_kid"   # ambiguous now


# ------------------------------------------------------------------------------ unit: the JWK Set
async def test_unknown_kid_refreshes_early_and_the_rotated_key_is_accepted(keys, logs):
    a, b = keys["a"], keys["b"]
    with jwks_server([jwk_of(a, "k1")]) as srv:
        async with started(oauth_cfg(srv.url, jwks_refresh_s=3600, jwks_min_refresh_s=0.2)) as v:
            new = sign(b, "k2")
            srv.keys = [jwk_of(b, "k2")]                    # the OAuth server rotates its key
            assert v.check(bearer(new)) == "unknown_kid"    # this request: 401, and an early fetch
            assert await eventually(lambda: v.check(bearer(new)) is None, 10.0)
            assert v.kids == ["k2"]
            assert v.check(bearer(sign(a, "k1"))) == "unknown_kid"   # the old key is gone
            assert srv.hits >= 2
    loaded = logs.events("oauth.jwks_loaded")
    assert [e["why"] for e in loaded][:2] == ["start", "unknown_kid"], loaded
    assert loaded[1]["kids"] == ["k2"] and loaded[1]["changed"] is True


async def test_early_refresh_is_rate_limited(keys, logs):
    """A flood of tokens with unknown kids costs at most one fetch per jwks_min_refresh_s."""
    a = keys["a"]
    with jwks_server([jwk_of(a, "k1")]) as srv:
        async with started(oauth_cfg(srv.url, jwks_refresh_s=3600, jwks_min_refresh_s=60)) as v:
            for i in range(200):
                assert v.check(bearer(sign(a, f"unknown-{i}"))) == "unknown_kid"
                if i % 20 == 0:
                    await asyncio.sleep(0.01)
            await asyncio.sleep(0.5)
            assert srv.hits == 1 and v.fetches == 1


async def test_periodic_refresh_picks_up_rotated_keys(keys, logs):
    a, b = keys["a"], keys["b"]
    with jwks_server([jwk_of(a, "k1")]) as srv:
        async with started(oauth_cfg(srv.url, jwks_refresh_s=0.3, jwks_min_refresh_s=0.3)) as v:
            srv.keys = [jwk_of(a, "k1"), jwk_of(b, "k2")]
            assert await eventually(lambda: v.kids == ["k1", "k2"], 10.0)   # no request asked
            assert v.check(bearer(sign(b, "k2"))) is None
    assert any(e["why"] == "periodic" and e["changed"] for e in logs.events("oauth.jwks_loaded"))


async def test_jwks_down_at_start_then_recovers(keys, logs):
    a = keys["a"]
    with jwks_server([jwk_of(a, "k1")]) as srv:
        srv.status = 503
        v = JwtValidator(oauth_cfg(srv.url, jwks_refresh_s=3600, jwks_min_refresh_s=0.2))
        await v.start()      # a failure is a warning, not an error
        try:
            failed = logs.events("oauth.jwks_failed")
            assert failed and "HTTP 503" in failed[0]["error"] and failed[0]["keys_kept"] == 0
            assert "hint" in failed[0]
            tok = sign(a, "k1")
            assert v.check(bearer(tok)) == "no_keys"     # asks for an early fetch too
            srv.status = 200
            assert await eventually(lambda: v.check(bearer(tok)) is None, 10.0)
        finally:
            await v.aclose()


async def test_failed_refresh_keeps_the_previous_keys(keys, logs):
    a = keys["a"]
    with jwks_server([jwk_of(a, "k1")]) as srv:
        async with started(oauth_cfg(srv.url, jwks_refresh_s=3600, jwks_min_refresh_s=60)) as v:
            for raw in (b"<html>oops</html>", b'{"keys": []}', b'{"nokeys": 1}', b"[" * 100_000,
                        b"x" * (MAX_JWKS_BYTES + 1)):
                srv.raw = raw
                assert not await v.refresh("test")
                assert v.check(bearer(sign(a, "k1"))) is None
    errors = [e["error"] for e in logs.events("oauth.jwks_failed")]
    assert len(errors) == 5, errors
    assert "not JSON" in errors[0] and "no usable signing key" in errors[1]
    assert "not a JWK Set" in errors[2] and "too large" in errors[4]


async def test_slow_jwks_server_is_bounded_and_never_blocks_the_loop(keys, logs):
    """The fetch runs in a thread: the event loop keeps ticking while the server stalls, and the
    attempt gives up after about jwks_timeout_s."""
    a = keys["a"]
    with jwks_server([jwk_of(a, "k1")]) as srv:
        srv.delay_s = 3.0
        v = JwtValidator(oauth_cfg(srv.url, jwks_timeout_s=0.5, jwks_refresh_s=3600, jwks_min_refresh_s=60))
        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            while True:
                ticks += 1
                await asyncio.sleep(0.01)

        t = asyncio.get_running_loop().create_task(ticker())
        try:
            await asyncio.wait_for(v.start(), 10.0)
        finally:
            t.cancel()
            await v.aclose()
        assert ticks >= 5        # the loop ran during the fetch
        failed = logs.events("oauth.jwks_failed")
        assert failed, logs.getvalue()
        assert "timed out" in failed[0]["error"] or "TimeoutError" in failed[0]["error"], failed
        assert v.check(bearer(sign(a, "k1"))) == "no_keys"


def test_parse_jwks_skips_what_cannot_verify(keys):
    a = keys["a"]
    good = jwk_of(a, "sig")
    ks = parse_jwks(json.dumps({"keys": [
        good, {**jwk_of(a, "enc"), "use": "enc"}, {"kty": "oct", "k": "c2VjcmV0", "kid": "hmac"},
        {**jwk_of(a, "mismatch"), "alg": "ES256"}, {"kty": "RSA", "kid": "broken", "n": "x", "e": "y"},
        "not-an-object", {**good, "kid": 7}, {**jwk_of(keys["b"], "sig")},   # duplicate kid
    ]}).encode())
    assert list(ks.keys) == ["sig"] and ks.skipped == 7


def test_fetch_refuses_an_oversized_content_length(keys):
    with jwks_server() as srv:
        srv.raw = b" " * (MAX_JWKS_BYTES + 10)
        with pytest.raises(Exception, match="too large"):
            fetch_jwks(srv.url, 2.0)


def test_fetch_follows_no_redirect(keys):
    """The keys come from exactly the configured URL: a redirect (even to a server that serves
    a valid key set) is an error, never a fetch from elsewhere."""
    with jwks_server([jwk_of(keys["a"], "a")]) as good, jwks_server() as redirecting:
        redirecting.status, redirecting.location = 302, good.url
        with pytest.raises(Exception, match="HTTP 302"):
            fetch_jwks(redirecting.url, 2.0)
        assert good.hits == 0
        assert fetch_jwks(good.url, 2.0) is not None     # the same key set, fetched directly


# ------------------------------------------------------------------------------ config
def _load(env: dict[str, str]):
    return load_config(None, env=env)


OAUTH_ENV = {"VOICEBRIDGE_OAUTH_ENABLED": "true", "VOICEBRIDGE_OAUTH_JWKS_URL": "https://idp.test/jwks",
             "VOICEBRIDGE_OAUTH_ISSUER": ISSUER, "VOICEBRIDGE_OAUTH_AUDIENCE": AUDIENCE}


def test_config_oauth_defaults_env_and_validation():
    cfg, _ = _load({"VOICEBRIDGE_TOKEN": "t"})
    assert cfg.oauth == OAuthConfig() and cfg.oauth.enabled is False and cfg.oauth.algorithms == ["RS256"]
    # oauth alone is a third way to authenticate VAIC (no VOICEBRIDGE_TOKEN needed)
    cfg, secrets = _load({**OAUTH_ENV, "VOICEBRIDGE_OAUTH_ALGORITHMS": '["ES256", "PS256"]',
                          "VOICEBRIDGE_OAUTH_LEEWAY_S": "5"})
    assert not secrets.token and cfg.oauth.enabled and cfg.oauth.algorithms == ["ES256", "PS256"]
    assert cfg.oauth.jwks_url == "https://idp.test/jwks" and cfg.oauth.leeway_s == 5.0
    with pytest.raises(ConfigError, match="server.allow_unauthenticated: .*oauth.enabled"):
        _load({})
    bad = {
        "VOICEBRIDGE_OAUTH_JWKS_URL": ("file:///etc/passwd", "oauth.jwks_url"),
        "VOICEBRIDGE_OAUTH_ISSUER": ('""', "oauth.issuer"),
        "VOICEBRIDGE_OAUTH_AUDIENCE": ('""', "oauth.audience"),
        "VOICEBRIDGE_OAUTH_LEEWAY_S": ("-1", "oauth.leeway_s"),
        "VOICEBRIDGE_OAUTH_JWKS_TIMEOUT_S": ("0", "oauth.jwks_timeout_s"),
        "VOICEBRIDGE_OAUTH_JWKS_MIN_REFRESH_S": ("0", "oauth.jwks_min_refresh_s"),
        "VOICEBRIDGE_OAUTH_JWKS_REFRESH_S": ("1", "oauth.jwks_refresh_s"),   # below min (10)
    }
    for name, (value, key) in bad.items():
        with pytest.raises(ConfigError, match=f"^{key}: "):
            _load({**OAUTH_ENV, name: value})
    with pytest.raises(ConfigError, match="^oauth.jwks_url: must be https"):
        _load({**OAUTH_ENV, "VOICEBRIDGE_OAUTH_JWKS_URL": "http://idp.example/jwks"})
    cfg, _ = _load({**OAUTH_ENV, "VOICEBRIDGE_OAUTH_JWKS_URL": "http://127.0.0.1:9/jwks"})   # loopback
    for algs in ('["none"]', '["HS256"]', '[]', '["RS256", "HS512"]'):
        with pytest.raises(ConfigError, match="^oauth.algorithms: "):
            _load({**OAUTH_ENV, "VOICEBRIDGE_OAUTH_ALGORITHMS": algs})
    with pytest.raises(ConfigError, match="oauth"):
        _load({**OAUTH_ENV, "VOICEBRIDGE_OAUTH_NOSUCH": "1"})
    # disabled: nothing of [oauth] is checked
    cfg, _ = _load({"VOICEBRIDGE_TOKEN": "t", "VOICEBRIDGE_OAUTH_JWKS_URL": "nonsense"})
    assert not cfg.oauth.enabled


# ------------------------------------------------------------------------------ the real daemon
def daemon_oauth_env(url: str, **over: str) -> dict[str, str]:
    env = {"VOICEBRIDGE_OAUTH_ENABLED": "true", "VOICEBRIDGE_OAUTH_JWKS_URL": url,
           "VOICEBRIDGE_OAUTH_ISSUER": ISSUER, "VOICEBRIDGE_OAUTH_AUDIENCE": AUDIENCE,
           "VOICEBRIDGE_OAUTH_JWKS_MIN_REFRESH_S": "0.3", "VOICEBRIDGE_OAUTH_JWKS_TIMEOUT_S": "2",
           "VOICEBRIDGE_LOG_RATE_LIMIT_PER_S": "1000",    # every auth.rejected line is written
           "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost"}
    env.update(over)
    return env


async def upgrade_status(port: int, token: str | None) -> int | None:
    ws = await RawWs.open("127.0.0.1", port, "/voicebridge", token, timeout_s=5.0)
    ws.abort()
    return ws.status


async def jwt_call(url: str, token: str) -> None:
    """One short call authenticated by `token`: accepted, the bot answers, the caller hangs up."""
    res = await run_call(CallerConfig(url=url, token=token, conversation_id="jwt-" + uuid.uuid4().hex[:10],
                                      formats=["raw/lpcm16_24"], accept_timeout_s=5.0,
                                      script=[Speak(600), WaitForBot(6000), Silence(100)]))
    assert res.connect_error is None and res.session_error is None, (res.connect_error, res.session_error)
    assert res.accepted_format == "raw/lpcm16_24"      # session.initiate -> session.accepted
    assert res.end_reason == "caller-hangup" and res.streams and not res.violations, res.end_reason


async def test_daemon_accepts_a_jwt_and_the_permanent_token_and_rejects_bad_ones(keys, tmp_path):
    a, b = keys["a"], keys["b"]
    now = int(time.time())
    bad = {
        "expired": sign(a, "k1", exp=now - 120),
        "not_yet_valid": sign(a, "k1", nbf=now + 600),
        "wrong_issuer": sign(a, "k1", iss="https://evil.test/"),
        "wrong_audience": sign(a, "k1", aud="other"),
        "bad_signature": sign(b, "k1"),
        "bad_algorithm": unsigned("none", "k1"),
        "malformed": "garbage-token",
    }
    # longer than a header line may be: the HTTP layer answers 431 before any auth check
    oversized = sign(a, "k1", pad="y" * MAX_TOKEN_BYTES)
    good = sign(a, "k1")
    with jwks_server([jwk_of(a, "k1")]) as srv:
        async with running_fake() as fake, running_daemon(fake, tmp_path, **daemon_oauth_env(srv.url)) as d:
            assert await d.wait_event("oauth.jwks_loaded", 10.0, why="start")
            assert (await d.wait_event("server.listening", 5.0))["auth"] == "bearer+oauth"
            await jwt_call(d.url, good)                                   # 101, a whole call
            await jwt_call(d.url, TOKEN)                                  # the permanent token
            for why, tok in bad.items():
                assert await upgrade_status(d.port, tok) == 401, why
                assert await d.wait_event("auth.rejected", 5.0, why=why), why
            assert await upgrade_status(d.port, oversized) == 431
            assert await upgrade_status(d.port, None) == 401
            assert await d.wait_event("auth.rejected", 5.0, why="missing")
            # the OAuth server rotates: an unknown kid gets 401 and an early refresh, then passes
            rotated = sign(b, "k2")
            srv.keys = [jwk_of(a, "k1"), jwk_of(b, "k2")]
            assert await upgrade_status(d.port, rotated) == 401
            assert await d.wait_event("auth.rejected", 5.0, why="unknown_kid")
            assert await d.wait_event("oauth.jwks_loaded", 10.0, why="unknown_kid")
            await jwt_call(d.url, rotated)
            health = await d.health()
            assert health["status"] == "ok"
        text = d.log_text()
    assert not d.non_json_lines()
    for tok in [good, rotated, oversized, *bad.values()]:
        sig = tok.rsplit(".", 1)[-1]
        assert tok not in text and (len(sig) < 16 or sig[:40] not in text)


async def test_daemon_oauth_only_starts_without_jwks_and_recovers(keys, tmp_path):
    """No VOICEBRIDGE_TOKEN and the JWKS down at start: the daemon starts anyway (a warning),
    JWTs get 401 no_keys until the JWK Set loads, then calls go through."""
    a = keys["a"]
    with jwks_server([jwk_of(a, "k1")]) as srv:
        srv.status = 503
        env = daemon_oauth_env(srv.url, VOICEBRIDGE_TOKEN="", VOICEBRIDGE_OAUTH_JWKS_REFRESH_S="3600")
        async with running_fake() as fake, running_daemon(fake, tmp_path, **env) as d:
            failed = await d.wait_event("oauth.jwks_failed", 10.0, why="start")
            assert failed and "503" in failed["error"]
            assert (await d.wait_event("server.listening", 5.0))["auth"] == "oauth"
            good = sign(a, "k1")
            assert await upgrade_status(d.port, good) == 401
            assert await d.wait_event("auth.rejected", 5.0, why="no_keys")
            assert await upgrade_status(d.port, TOKEN) == 401      # no permanent token configured
            assert await d.wait_event("auth.rejected", 5.0, why="malformed")
            srv.status = 200
            end = time.monotonic() + 15.0
            status = None
            while time.monotonic() < end:
                status = await upgrade_status(d.port, good)
                if status == 101:
                    break
                await asyncio.sleep(0.2)
            assert status == 101
            await jwt_call(d.url, good)
        assert good not in d.log_text()
