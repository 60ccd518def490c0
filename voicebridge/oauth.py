"""VAIC's OAuth mode: validate `Authorization: Bearer <JWT>` against the OAuth server's JWK Set.

VoiceAI Connect can fetch an access token from the customer's OAuth server (client-credentials
grant) and send it on the websocket upgrade instead of the permanent token. `JwtValidator`
checks such a token with PyJWT: signature against a key of the cached JWK Set (picked by the
token's `kid`), `iss`, `aud`, `exp` (all three required), `nbf`/`iat` when present, each time
with `oauth.leeway_s` of clock skew; the header's `alg` must be one of `oauth.algorithms`
(asymmetric only, see `config.OAUTH_ALGORITHMS`), match the key's type, and match the key's own
`alg` when the JWK names one.

Contracts:
- `check(authorization_header)` is synchronous and cheap (one signature check, no I/O): it uses
  only the cached key set, so `process_request` can call it. It never raises; it returns None
  for a valid token, else a short reason token (`REASONS`). It never logs, and never keeps the
  token.
- The JWK Set is fetched off the event loop (a daemon thread per fetch, at most one at a time,
  so a hung DNS lookup can neither block the loop nor hold up the process exit), bounded by
  `oauth.jwks_timeout_s` and `MAX_JWKS_BYTES`; at most `MAX_KEYS` keys are kept.
- `start()` fetches once (a failure is a warning, not an error: the permanent token still works)
  and starts the refresher: every `oauth.jwks_refresh_s` (which is also the retry interval after
  a failure), and early when a token names an unknown `kid` or no keys are loaded yet, but never
  sooner than `oauth.jwks_min_refresh_s` after the previous attempt. The request that triggered
  the early refresh gets its 401; the ones after the refresh succeed. A failed refresh keeps the
  previous keys.
- `aclose()` stops the refresher; a fetch still running in its thread is abandoned.
"""

from __future__ import annotations

import asyncio
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import Any, NamedTuple, TypeVar

import jwt
import msgspec

from . import __version__
from .bounds import clip, clip_list
from .config import OAuthConfig
from .log import get_logger

MAX_TOKEN_BYTES = 8 * 1024        # a longer bearer is refused unparsed ("oversized")
MAX_JWKS_BYTES = 1024 * 1024      # a larger JWK Set is a failed fetch
MAX_KEYS = 64                     # keys kept from one JWK Set (the rest are skipped)
READ_CHUNK_BYTES = 64 * 1024

REASONS = ("missing", "malformed", "oversized", "bad_algorithm", "no_keys", "unknown_kid",
           "bad_signature", "expired", "not_yet_valid", "wrong_issuer", "wrong_audience",
           "missing_claim", "invalid")

# the JWK key type each allowed algorithm needs
_KTY_OF_ALG = {"RS256": "RSA", "RS384": "RSA", "RS512": "RSA", "PS256": "RSA", "PS384": "RSA",
               "PS512": "RSA", "ES256": "EC", "ES384": "EC", "ES512": "EC", "EdDSA": "OKP"}
_REQUIRED_CLAIMS = ["exp", "iss", "aud"]

T = TypeVar("T")


class JwksError(Exception):
    """A JWK Set could not be fetched or used; the message says why (safe to log)."""


class SigningKey(NamedTuple):
    key: Any              # a cryptography public key object
    kty: str              # "RSA", "EC", "OKP"
    alg: str | None       # the JWK's own "alg", if it names one
    fingerprint: bytes    # the JWK as canonical JSON: tells a changed key under the same kid


class KeySet(NamedTuple):
    keys: dict[str, SigningKey]    # kid ("" for a JWK without one) -> key
    skipped: int                   # JWKs not usable for signatures (other use, kty, broken, too many)


def parse_jwks(body: bytes) -> KeySet:
    """The usable signing keys of a JWK Set document; JwksError if it is not one or has none."""
    try:
        doc = msgspec.json.decode(body)
    except msgspec.DecodeError as e:
        raise JwksError(f"not JSON: {clip(str(e), 100)}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("keys"), list):
        raise JwksError("not a JWK Set: no 'keys' list")
    keys: dict[str, SigningKey] = {}
    skipped = 0
    for jwk in doc["keys"]:
        kty = jwk.get("kty") if isinstance(jwk, dict) else None
        kid = jwk.get("kid", "") if isinstance(jwk, dict) else None
        alg = jwk.get("alg") if isinstance(jwk, dict) else None
        if (len(keys) >= MAX_KEYS or not isinstance(jwk, dict) or jwk.get("use", "sig") != "sig"
                or kty not in ("RSA", "EC", "OKP") or not isinstance(kid, str) or kid in keys
                or (alg is not None and _KTY_OF_ALG.get(alg) != kty)):
            skipped += 1
            continue
        try:
            key = jwt.PyJWK(jwk).key
        except (jwt.PyJWTError, ValueError, TypeError, KeyError, AttributeError):
            skipped += 1
            continue
        keys[kid] = SigningKey(key, kty, alg, msgspec.json.encode(jwk, order="sorted"))
    if not keys:
        raise JwksError(f"no usable signing key in the JWK Set ({skipped} skipped)")
    return KeySet(keys, skipped)


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    """A redirect is an error (HTTPError 3xx), not a fetch from another URL."""

    def redirect_request(self, req: Any, fp: Any, code: int, msg: str, headers: Any,
                         newurl: str) -> None:
        return None


_OPENER = urllib.request.build_opener(_NoRedirects)


def fetch_jwks(url: str, timeout_s: float, max_bytes: int = MAX_JWKS_BYTES) -> KeySet:
    """GET `url` and parse it (blocking: run it off the event loop). Bounded by `max_bytes`, and
    in time by `timeout_s` per socket operation plus a deadline checked between reads (so at
    most about twice `timeout_s`, DNS aside). Redirects are refused: the keys must come from
    exactly the configured (https) URL, never from wherever a redirect points."""
    deadline = time.monotonic() + timeout_s
    req = urllib.request.Request(url, headers={"Accept": "application/json",
                                               "User-Agent": f"voicebridge/{__version__}"})
    try:
        with _OPENER.open(req, timeout=timeout_s) as resp:   # https (or loopback http): config
            length = resp.headers.get("Content-Length")
            if length is not None and length.isdigit() and int(length) > max_bytes:
                raise JwksError(f"JWK Set too large: {length} bytes > {max_bytes}")
            chunks: list[bytes] = []
            total = 0
            while True:
                if time.monotonic() > deadline:
                    raise JwksError(f"timed out after {timeout_s} s reading the JWK Set")
                chunk = resp.read1(READ_CHUNK_BYTES)
                if not chunk:
                    break
                total += len(chunk)
                if total > max_bytes:
                    raise JwksError(f"JWK Set too large: more than {max_bytes} bytes")
                chunks.append(chunk)
    except JwksError:
        raise
    except urllib.error.HTTPError as e:
        raise JwksError(f"HTTP {e.code} from the JWKS URL") from None
    except (OSError, ValueError, urllib.error.URLError) as e:   # refused, DNS, TLS, timeout, bad URL
        raise JwksError(f"{type(e).__name__}: {clip(str(e), 150)}") from None
    return parse_jwks(b"".join(chunks))


def _in_daemon_thread(fn: Callable[[], T]) -> asyncio.Future[T]:
    """Run `fn` in a new daemon thread; its result (or exception) completes the future. Unlike
    the default executor, a thread stuck in a DNS lookup never delays the process exit."""
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[T] = loop.create_future()

    def deliver(ok: bool, value: Any) -> None:
        if not fut.done():
            if ok:
                fut.set_result(value)
            else:
                fut.set_exception(value)

    def run() -> None:
        ok: bool = True
        value: Any = None
        try:
            value = fn()
        except BaseException as e:   # handed to the awaiting side, never lost in the thread
            ok, value = False, e
        try:
            loop.call_soon_threadsafe(deliver, ok, value)
        except RuntimeError:         # the loop is closed: nobody is waiting any more
            pass

    # an abandoned (timed-out) fetch that fails later must not log "exception never retrieved"
    fut.add_done_callback(lambda f: f.cancelled() or f.exception())
    threading.Thread(target=run, name="voicebridge-jwks", daemon=True).start()
    return fut


class JwtValidator:
    """Bearer JWTs of VAIC's OAuth mode, checked against the cached JWK Set (module docstring)."""

    def __init__(self, cfg: OAuthConfig) -> None:
        self.cfg = cfg
        self.log = get_logger()
        self._algorithms = frozenset(cfg.algorithms)
        self._keys: dict[str, SigningKey] = {}
        self._last_attempt = -1e18          # monotonic time of the last fetch attempt
        self._wake = asyncio.Event()        # a request asks for an early refresh
        self._wake_why = ""
        self._inflight: asyncio.Future[KeySet] | None = None
        self._task: asyncio.Task[None] | None = None
        self.fetches = 0                    # attempts so far (tests, diagnostics)

    @property
    def kids(self) -> list[str]:
        """The key ids currently loaded."""
        return sorted(self._keys)

    # ------------------------------------------------------------------ per request
    def check(self, authorization_header: bytes) -> str | None:
        """None if the header carries a valid bearer JWT, else a reason token from `REASONS`."""
        try:
            return self._check(authorization_header)
        except Exception:   # a peer's token must never raise out of process_request
            return "invalid"

    def _check(self, header: bytes) -> str | None:
        if not header:
            return "missing"
        scheme, _, token = header.partition(b" ")
        token = token.strip()
        if scheme.lower() != b"bearer" or not token:
            return "malformed"
        if len(token) > MAX_TOKEN_BYTES:
            return "oversized"
        if token.count(b".") != 2:
            return "malformed"
        try:
            head = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            return "malformed"
        alg, kid = head.get("alg"), head.get("kid")
        if not isinstance(alg, str) or alg not in self._algorithms:
            return "bad_algorithm"
        if kid is not None and not isinstance(kid, str):
            return "malformed"
        keys = self._keys
        if not keys:
            self._want_refresh("no_keys")
            return "no_keys"
        if kid is None:   # no kid: only unambiguous with a single key
            key = next(iter(keys.values())) if len(keys) == 1 else None
        else:
            key = keys.get(kid)
        if key is None:
            self._want_refresh("unknown_kid")
            return "unknown_kid"
        if _KTY_OF_ALG[alg] != key.kty or (key.alg is not None and key.alg != alg):
            return "bad_algorithm"
        try:
            jwt.decode(token, key.key, algorithms=[alg], issuer=self.cfg.issuer,
                       audience=self.cfg.audience, leeway=self.cfg.leeway_s,
                       options={"require": _REQUIRED_CLAIMS})
        except jwt.ExpiredSignatureError:
            return "expired"
        except jwt.ImmatureSignatureError:
            return "not_yet_valid"
        except jwt.InvalidIssuerError:
            return "wrong_issuer"
        except jwt.InvalidAudienceError:
            return "wrong_audience"
        except jwt.MissingRequiredClaimError:
            return "missing_claim"
        except jwt.InvalidSignatureError:
            return "bad_signature"
        except jwt.InvalidAlgorithmError:
            return "bad_algorithm"
        except (jwt.DecodeError, jwt.InvalidIssuedAtError):
            return "malformed"
        except jwt.PyJWTError:
            return "invalid"
        return None

    def _want_refresh(self, why: str) -> None:
        if not self._wake.is_set():
            self._wake_why = why
            self._wake.set()

    # ------------------------------------------------------------------ JWK Set
    async def refresh(self, why: str) -> bool:
        """Fetch the JWK Set once (bounded); True if a key set was loaded (the same or a new
        one). A failure is logged and keeps the previous keys."""
        self._last_attempt = time.monotonic()
        self.fetches += 1
        cfg = self.cfg
        fields: dict[str, Any] = {"why": why, "url": clip(cfg.jwks_url, 200)}
        if self._inflight is not None and not self._inflight.done():
            self.log.warning("oauth.jwks_failed", **fields, error="the previous fetch is still running",
                             keys_kept=len(self._keys), retry_in_s=cfg.jwks_refresh_s)
            return False
        t0 = time.monotonic()
        self._inflight = fut = _in_daemon_thread(lambda: fetch_jwks(cfg.jwks_url, cfg.jwks_timeout_s))
        # asyncio.wait, not wait_for: 3.11's wait_for can swallow a cancellation (aclose)
        await asyncio.wait({fut}, timeout=cfg.jwks_timeout_s + 0.5)
        try:
            if not fut.done():
                raise TimeoutError
            got = fut.result()
        except Exception as e:   # JwksError, the timeout, or anything unforeseen: never fatal
            error = (str(e) if isinstance(e, JwksError) else f"timed out after {cfg.jwks_timeout_s} s"
                     if isinstance(e, TimeoutError) else f"{type(e).__name__}: {e}")
            if not self._keys:
                fields["hint"] = ("JWTs get 401 (no_keys) until the JWK Set loads; "
                                  "VOICEBRIDGE_TOKEN, if set, still works")
            self.log.warning("oauth.jwks_failed", **fields, error=clip(error, 200),
                             keys_kept=len(self._keys), retry_in_s=cfg.jwks_refresh_s)
            return False
        changed = ({k: v.fingerprint for k, v in got.keys.items()}
                   != {k: v.fingerprint for k, v in self._keys.items()})
        self._keys = got.keys
        level = "info" if changed or why != "periodic" else "debug"
        getattr(self.log, level)("oauth.jwks_loaded", **fields, keys=len(got.keys),
                                 kids=clip_list(sorted(got.keys)), skipped=got.skipped, changed=changed,
                                 fetch_ms=round((time.monotonic() - t0) * 1000, 1))
        return True

    async def _refresher(self) -> None:
        cfg = self.cfg
        while True:
            due = self._last_attempt + cfg.jwks_refresh_s
            waiter = asyncio.ensure_future(self._wake.wait())
            try:   # asyncio.wait, not wait_for: 3.11's wait_for can swallow our cancellation
                await asyncio.wait({waiter}, timeout=max(0.0, due - time.monotonic()))
            finally:
                waiter.cancel()
            why = self._wake_why if self._wake.is_set() else "periodic"
            gap = self._last_attempt + cfg.jwks_min_refresh_s - time.monotonic()
            if gap > 0:
                await asyncio.sleep(gap)
            self._wake.clear()   # requests up to now are served by this fetch
            await self.refresh(why)

    async def start(self) -> None:
        """The first fetch (a failure is only a warning), then the background refresher."""
        if self._task is not None:
            return
        await self.refresh("start")
        self._task = asyncio.get_running_loop().create_task(self._refresher(), name="jwks-refresher")

    async def aclose(self) -> None:
        """Stop the refresher; a fetch running in its thread is abandoned."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.wait({task}, timeout=2.0)
