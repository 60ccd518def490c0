"""Configuration: `config.toml` + environment overrides, validated once at start.

Contract:
- Non-secret settings live in the TOML file. Any of them can be overridden by an environment
  variable `VOICEBRIDGE_<SECTION>_<KEY>` (e.g. `VOICEBRIDGE_SERVER_PORT=9000`); the value is
  parsed as TOML when possible (numbers, booleans, arrays) and as a plain string otherwise.
- Secrets are read from the environment only, never from the file: `VOICEBRIDGE_TOKEN` (the
  bearer token VoiceAI Connect presents), `OPENAI_API_KEY`, `AZURE_OPENAI_API_KEY`. A secret key
  found in the file is a configuration error, so a token cannot end up committed to git.
- Any problem raises `ConfigError` whose message names the offending key (`server.port`, ...).
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Any, Callable, Literal, Mapping
from urllib.parse import urlsplit

import msgspec

from .audio import FORMATS
from .profiles import McpServer, ProfileConfig, TranscriptsConfig, WebhookTool
from .profiles import check as check_profiles
from .transport import TRANSPORTS

SECRET_ENV = ("VOICEBRIDGE_TOKEN", "VOICEBRIDGE_ADMIN_TOKEN", "OPENAI_API_KEY", "AZURE_OPENAI_API_KEY",
              "VOICEBRIDGE_WEBHOOK_SECRET")
_SECRET_KEYS = {"token", "api_key", "apikey", "key", "secret", "password"}


class ConfigError(ValueError):
    """Invalid configuration; the message names the key and what is wrong."""


class ServerConfig(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    host: str = "0.0.0.0"
    port: int = 8080
    path: str = "/voicebridge"
    allow_unauthenticated: bool = False
    max_message_bytes: int = 1024 * 1024
    ping_interval_s: float = 20.0
    transport: str = "picows"   # a name in transport.TRANSPORTS: picows, fast, websockets
    # bounds (README: "Limits and hardening")
    max_calls: int = 400
    max_pending_handshakes: int = 128
    handshake_timeout_s: float = 5.0
    backlog: int = 1024
    send_buffer_bytes: int = 1024 * 1024
    send_timeout_s: float = 10.0
    recv_queue_bytes: int = 4 * 1024 * 1024
    max_fragments: int = 128
    shutdown_timeout_s: float = 10.0
    drain_timeout_s: float = 60.0      # SIGTERM: calls go on this long, then are hung up
    ready_dial_fail_s: float = 30.0    # /ready is 503 once every OpenAI dial failed for this long
    # the admin listener: /metrics and the detailed /health (-1: none, 0: any free port)
    admin_host: str = "127.0.0.1"
    admin_port: int = 8081
    metrics_cache_s: float = 1.0
    # worker processes on the same port (SO_REUSEPORT, supervisor.py): an int, or "auto" for the
    # CPUs this process may run on; 1 is the plain single process
    workers: int | str = 1
    # stalls (stalls.py): a slow_frame line when one frame's path through the bridge takes this
    # long, a slow_loop line when the loop probe (a timer every loop_probe_ms) runs this late;
    # 0 turns either off; at most slow_log_max lines of each per slow_log_interval_s
    slow_frame_ms: float = 10.0
    slow_loop_ms: float = 20.0
    loop_probe_ms: float = 25.0
    slow_log_max: int = 5
    slow_log_interval_s: float = 60.0
    # the garbage collector: freeze what exists after start-up (no collection scans it again);
    # gc_threshold: gc.set_threshold's values ([] keeps CPython's 700, 10, 10)
    gc_freeze: bool = True
    gc_threshold: list[int] = msgspec.field(default_factory=list)


class VadConfig(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    type: Literal["server_vad", "semantic_vad", "none"] = "server_vad"
    threshold: float = 0.5
    prefix_padding_ms: int = 300
    silence_duration_ms: int = 400
    eagerness: Literal["low", "medium", "high", "auto"] = "auto"
    create_response: bool = True
    interrupt_response: bool = True


class OpenAIConfig(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    provider: Literal["openai", "azure"] = "openai"
    url: str = "wss://api.openai.com/v1/realtime"
    model: str = "gpt-realtime"
    azure_endpoint: str = ""
    azure_deployment: str = ""
    connect_timeout_s: float = 5.0
    connect_budget_s: float = 10.0     # all dial attempts of one (re)connect, back-off included
    reconnect: bool = True             # a lost OpenAI socket mid-call is replaced, the call goes on
    rotate_after_s: float = 3300.0     # a new session at the next pause before the 60-minute cap
    session_timeout_s: float = 5.0
    close_timeout_s: float = 1.0
    max_message_bytes: int = 16 * 1024 * 1024
    voice: str = "marin"
    instructions: str = "You are a helpful phone assistant. Keep answers short."
    greeting: str = ""
    transcription_model: str = ""
    noise_reduction: Literal["", "near_field", "far_field"] = ""
    vad: VadConfig = msgspec.field(default_factory=VadConfig)


class AudioConfig(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    format_preference: list[str] = msgspec.field(
        default_factory=lambda: [
            # raw before wav: raw/lpcm16 and raw/lpcm16_8 are seen working with VAIC (a real
            # Live Hub call), the wav/* framing of streamed chunks is unverified
            "raw/lpcm16_24", "raw/mulaw", "raw/lpcm16", "raw/lpcm16_8",
            "wav/lpcm16_24", "wav/mulaw", "wav/lpcm16", "wav/lpcm16_8",
        ]
    )
    playout_lead_ms: int = 200
    max_chunk_ms: int = 100
    vaic_stop_policy: Literal["flush", "drain"] = "flush"
    stop_margin_ms: int = 60
    max_pending_audio_ms: int = 180_000
    early_audio_max_ms: int = 10_000
    max_frame_ms: int = 1000
    max_delta_ms: int = 10_000


class CallConfig(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    start_wait_ms: int = 1500
    hangup_grace_s: float = 5.0
    initiate_timeout_s: float = 10.0
    idle_timeout_s: float = 60.0
    resume_grace_s: float = 10.0       # a dropped VAIC socket may session.resume within this
    send_speech_hypothesis: bool = False  # also userStream.speech.hypothesis at speech start


class LogConfig(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    level: Literal["debug", "info", "warning", "error"] = "info"
    rate_limit_per_s: float = 5.0
    mask_numbers: bool = False         # caller/callee numbers logged as +4930******67


# JWT signature algorithms [oauth] may allow: asymmetric only (never "none" or HS*, whose
# secret would have to be the public JWKS)
OAUTH_ALGORITHMS = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512",
                    "ES256", "ES384", "ES512", "EdDSA")


class OAuthConfig(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """VAIC's OAuth mode: the bearer may be a JWT from the customer's OAuth server (oauth.py)."""
    enabled: bool = False
    jwks_url: str = ""                 # the OAuth server's JWK Set, https:// (http on loopback)
    issuer: str = ""                   # required `iss`
    audience: str = ""                 # required `aud`
    algorithms: list[str] = msgspec.field(default_factory=lambda: ["RS256"])
    leeway_s: float = 30.0             # allowed clock skew for exp / nbf / iat
    jwks_refresh_s: float = 300.0      # periodic refetch (and retry after a failed fetch)
    jwks_min_refresh_s: float = 10.0   # an unknown kid refetches early, at most this often
    jwks_timeout_s: float = 5.0        # one fetch, connect to last byte


class RecordingConfig(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """Wire-level call recording (recording.py). Off while `dir` is empty; then a profile's
    `record = true` selects the calls recorded (or `record_all`, every call)."""
    dir: str = ""                      # absolute path; created 0700 if missing; files are 0600
    retention_days: float = 7.0        # older files are deleted (at start, then hourly)
    max_bytes_per_call: int = 128 * 1024 * 1024   # a file is closed at this size
    record_all: bool = False           # every call, whatever its profile says


class Config(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    server: ServerConfig = msgspec.field(default_factory=ServerConfig)
    openai: OpenAIConfig = msgspec.field(default_factory=OpenAIConfig)
    audio: AudioConfig = msgspec.field(default_factory=AudioConfig)
    call: CallConfig = msgspec.field(default_factory=CallConfig)
    log: LogConfig = msgspec.field(default_factory=LogConfig)
    oauth: OAuthConfig = msgspec.field(default_factory=OAuthConfig)
    # call control (profiles.py): per-number profiles, the tools they enable, transcripts
    profiles: dict[str, ProfileConfig] = {}
    webhooks: dict[str, WebhookTool] = {}
    mcp: dict[str, McpServer] = {}
    transcripts: TranscriptsConfig = msgspec.field(default_factory=TranscriptsConfig)
    recording: RecordingConfig = msgspec.field(default_factory=RecordingConfig)


class Secrets(msgspec.Struct, frozen=True):
    """Secrets from the environment. `repr` never shows their values."""

    token: str = ""
    openai_api_key: str = ""
    azure_api_key: str = ""
    admin_token: str = ""
    webhook_secret: str = ""                 # VOICEBRIDGE_WEBHOOK_SECRET: Bearer for [webhooks]
    mcp_tokens: dict[str, str] = {}          # [mcp.<label>].authorization_env's values

    def __repr__(self) -> str:
        return (f"Secrets(token={'set' if self.token else 'unset'}, "
                f"admin_token={'set' if self.admin_token else 'unset'}, "
                f"webhook_secret={'set' if self.webhook_secret else 'unset'}, "
                f"mcp_tokens={sorted(self.mcp_tokens)}, "
                f"openai_api_key={'set' if self.openai_api_key else 'unset'}, "
                f"azure_api_key={'set' if self.azure_api_key else 'unset'})")


def _path_of(err: msgspec.ValidationError) -> str:
    text = str(err)
    if " - at `$." in text:
        msg, _, path = text.partition(" - at `$.")
        return f"{path.rstrip('`')}: {msg}"
    return text


def _apply_env(raw: dict[str, Any], env: Mapping[str, str]) -> None:
    sections = {f.name: f.type for f in msgspec.structs.fields(Config)}
    for name, value in env.items():
        if not name.startswith("VOICEBRIDGE_") or name in SECRET_ENV:
            continue
        rest = name[len("VOICEBRIDGE_"):].lower()
        for section in sections:
            if rest.startswith(section + "_"):
                key = rest[len(section) + 1:]
                target = raw.setdefault(section, {})
                if not isinstance(target, dict):
                    raise ConfigError(f"{section}: must be a table")
                if section == "openai" and key.startswith("vad_"):
                    target = target.setdefault("vad", {})
                    key = key[4:]
                try:
                    parsed: Any = tomllib.loads(f"v = {value}")["v"]
                except tomllib.TOMLDecodeError:
                    parsed = value
                target[key] = parsed
                break
        else:
            raise ConfigError(f"{name}: no such configuration section (environment override)")


def _find_secret_keys(raw: Mapping[str, Any], prefix: str = "") -> None:
    for key, value in raw.items():
        path = f"{prefix}{key}"
        if prefix.startswith("webhooks.") and key == "parameters":
            continue        # a JSON schema: its property names are the tool's, not settings
        if key.lower() in _SECRET_KEYS:
            raise ConfigError(f"{path}: secrets are not read from the config file; "
                              f"set {', '.join(SECRET_ENV)} in the environment instead")
        if isinstance(value, dict):
            _find_secret_keys(value, path + ".")


def _check(cfg: Config, secrets: Secrets) -> None:
    def need(ok: bool, key: str, why: str) -> None:
        if not ok:
            raise ConfigError(f"{key}: {why}")

    s, o, a = cfg.server, cfg.openai, cfg.audio
    need(0 <= s.port <= 65535, "server.port", f"must be 0..65535, got {s.port}")
    need(s.path.startswith("/"), "server.path", f"must start with '/', got {s.path!r}")
    need(s.path not in ("/health", "/metrics", "/ready", "/live"), "server.path", f"{s.path!r} is reserved")
    need("?" not in s.path and "#" not in s.path, "server.path", "must be a plain path, no query")
    need(0 < s.ping_interval_s <= 3600, "server.ping_interval_s", "must be in (0, 3600]")
    need(s.transport in TRANSPORTS, "server.transport",
         f"unknown transport {s.transport!r}; known: {', '.join(sorted(TRANSPORTS))}")
    need(s.max_message_bytes >= 65536, "server.max_message_bytes", "must be at least 65536")
    need(s.allow_unauthenticated or bool(secrets.token) or cfg.oauth.enabled, "server.allow_unauthenticated",
         "VOICEBRIDGE_TOKEN is not set; set it, or set oauth.enabled = true, "
         "or set allow_unauthenticated = true explicitly")
    need(o.connect_timeout_s > 0, "openai.connect_timeout_s", "must be > 0")
    need(0 < o.close_timeout_s <= 1.0, "openai.close_timeout_s",
         "must be in (0, 1]: an open Realtime session is billed")
    need(o.max_message_bytes >= 1024 * 1024, "openai.max_message_bytes", "must be at least 1 MiB")
    need(bool(o.model), "openai.model", "must not be empty")
    if o.provider == "azure":
        need(o.azure_endpoint.startswith(("wss://", "ws://")), "openai.azure_endpoint",
             "must be wss://<resource>.openai.azure.com when provider = 'azure'")
        need(bool(o.azure_deployment), "openai.azure_deployment",
             "must name the deployment when provider = 'azure'")
    else:
        need(o.url.startswith(("wss://", "ws://")), "openai.url", "must be a ws:// or wss:// URL")
        need("?" not in o.url, "openai.url", "must not carry a query; the model goes in openai.model")
    need(0.0 <= o.vad.threshold <= 1.0, "openai.vad.threshold", "must be within 0..1")
    need(o.vad.silence_duration_ms >= 0, "openai.vad.silence_duration_ms", "must be >= 0")
    need(bool(a.format_preference), "audio.format_preference", "must list at least one format")
    for f in a.format_preference:
        need(f in FORMATS, "audio.format_preference",
             f"unknown format {f!r}; known: {', '.join(sorted(FORMATS))}")
    need(20 <= a.playout_lead_ms <= 2000, "audio.playout_lead_ms", "must be within 20..2000")
    need(10 <= a.max_chunk_ms <= 1000, "audio.max_chunk_ms", "must be within 10..1000")
    need(0 <= a.stop_margin_ms <= 1000, "audio.stop_margin_ms", "must be within 0..1000")
    need(a.max_pending_audio_ms >= 10_000, "audio.max_pending_audio_ms", "must be >= 10000")
    need(a.early_audio_max_ms >= 1000, "audio.early_audio_max_ms", "must be >= 1000")
    need(1 <= s.max_calls <= 100_000, "server.max_calls", "must be within 1..100000")
    need(1 <= s.max_pending_handshakes <= 100_000, "server.max_pending_handshakes",
         "must be within 1..100000")
    need(0 < s.handshake_timeout_s <= 60, "server.handshake_timeout_s", "must be in (0, 60]")
    need(1 <= s.backlog <= 65535, "server.backlog", "must be within 1..65535")
    need(s.send_buffer_bytes >= 65536, "server.send_buffer_bytes", "must be at least 65536")
    need(s.send_timeout_s > 0, "server.send_timeout_s", "must be > 0")
    need(s.recv_queue_bytes >= s.max_message_bytes, "server.recv_queue_bytes",
         "must be at least server.max_message_bytes")
    need(1 <= s.max_fragments <= 100_000, "server.max_fragments", "must be within 1..100000")
    need(s.shutdown_timeout_s > 0, "server.shutdown_timeout_s", "must be > 0")
    need(0 <= s.drain_timeout_s <= 86400, "server.drain_timeout_s", "must be within 0..86400")
    need(s.ready_dial_fail_s > 0, "server.ready_dial_fail_s", "must be > 0")
    need(-1 <= s.admin_port <= 65535, "server.admin_port", "must be -1 (off), 0 (any) or a port")
    need(s.admin_port <= 0 or s.admin_port != s.port, "server.admin_port",
         "must differ from server.port")
    need(0 <= s.metrics_cache_s <= 60, "server.metrics_cache_s", "must be within 0..60")
    need(o.session_timeout_s > 0, "openai.session_timeout_s", "must be > 0")
    need(o.connect_budget_s >= o.connect_timeout_s, "openai.connect_budget_s",
         "must be at least openai.connect_timeout_s")
    need(0 < o.rotate_after_s <= 3540, "openai.rotate_after_s",
         "must be within (0, 3540]: OpenAI ends a session after 60 minutes")
    need(0 <= cfg.call.resume_grace_s <= 120, "call.resume_grace_s", "must be within 0..120")
    need(a.max_frame_ms >= 100, "audio.max_frame_ms", "must be >= 100")
    need(a.max_delta_ms >= 1000, "audio.max_delta_ms", "must be >= 1000")
    need(cfg.call.initiate_timeout_s > 0, "call.initiate_timeout_s", "must be > 0")
    need(cfg.call.idle_timeout_s > 0, "call.idle_timeout_s", "must be > 0")
    need(cfg.log.rate_limit_per_s >= 1, "log.rate_limit_per_s", "must be >= 1")
    need(cfg.call.hangup_grace_s > 0, "call.hangup_grace_s", "must be > 0")
    need(cfg.call.start_wait_ms >= 0, "call.start_wait_ms", "must be >= 0")
    _check_oauth(cfg.oauth, need)
    _check_workers(s, need)
    _check_stalls(s, need)
    check_profiles(cfg.profiles, cfg.webhooks, cfg.mcp, cfg.openai, need)
    need(cfg.transcripts.retention_days > 0, "transcripts.retention_days", "must be > 0")
    from .profiles import for_config    # the resolved profiles (inheritance applied)
    for name, prof in for_config(cfg).items():
        need(not prof.record or bool(cfg.recording.dir), f"profiles.{name}.record",
             "needs [recording] dir (where the recordings are written)")
        need(not prof.transcripts or bool(cfg.transcripts.dir), f"profiles.{name}.transcripts",
             "needs [transcripts] dir (where the transcript files are written)")
    _check_recording(cfg.recording, need)
    for label, m in cfg.mcp.items():
        need(not m.authorization_env or bool(secrets.mcp_tokens.get(label)),
             f"mcp.{label}.authorization_env", f"{m.authorization_env[:64]} is not set in the environment")


MAX_WORKERS = 256


def worker_count(server: ServerConfig) -> int:
    """`server.workers` resolved: "auto" is the number of CPUs this process may run on
    (`os.sched_getaffinity`, which honours taskset and cgroup cpusets), else the integer."""
    if server.workers == "auto":
        return max(1, min(MAX_WORKERS, len(os.sched_getaffinity(0))))
    return int(server.workers)


def _check_workers(s: ServerConfig, need: Callable[[bool, str, str], None]) -> None:
    w = s.workers
    need(w == "auto" or (isinstance(w, int) and 1 <= w <= MAX_WORKERS), "server.workers",
         f'must be an integer within 1..{MAX_WORKERS} or "auto", got {str(w)[:40]!r}')
    if worker_count(s) > 1:   # every worker binds the same ports: port 0 would give each its own
        need(s.port != 0, "server.port", "must be a fixed port (not 0) when server.workers > 1")
        need(s.admin_port != 0, "server.admin_port",
             "must be a fixed port (not 0) or -1 when server.workers > 1")


def _check_stalls(s: ServerConfig, need: Callable[[bool, str, str], None]) -> None:
    need(s.slow_frame_ms == 0 or 0.001 <= s.slow_frame_ms <= 60_000, "server.slow_frame_ms",
         "must be 0 (off) or within 0.001..60000")
    need(s.slow_loop_ms == 0 or 1 <= s.slow_loop_ms <= 60_000, "server.slow_loop_ms",
         "must be 0 (off) or within 1..60000 (the probe's resolution is about 1 ms)")
    need(s.loop_probe_ms == 0 or 5 <= s.loop_probe_ms <= 60_000, "server.loop_probe_ms",
         "must be 0 (no probe: no loop lag figures, no slow_loop) or within 5..60000")
    need(s.slow_loop_ms == 0 or s.loop_probe_ms > 0, "server.slow_loop_ms",
         "needs the loop probe (server.loop_probe_ms > 0), or 0")
    need(1 <= s.slow_log_max <= 1000, "server.slow_log_max", "must be within 1..1000")
    need(0.1 <= s.slow_log_interval_s <= 86_400, "server.slow_log_interval_s", "must be within 0.1..86400")
    t = s.gc_threshold
    need(len(t) <= 3 and all(1 <= x <= 10_000_000 for x in t), "server.gc_threshold",
         "must be [] or 1 to 3 integers within 1..10000000 (gc.set_threshold; 0 would turn the collector off)")


def _check_recording(r: RecordingConfig, need: Callable[[bool, str, str], None]) -> None:
    need(not r.dir or os.path.isabs(r.dir), "recording.dir", f"must be an absolute path, got {r.dir[:100]!r}")
    need(0 < r.retention_days <= 3650, "recording.retention_days", "must be within (0, 3650]")
    need(1024 * 1024 <= r.max_bytes_per_call <= 1 << 40, "recording.max_bytes_per_call",
         "must be within 1 MiB..1 TiB")
    need(not r.record_all or bool(r.dir), "recording.record_all", "needs recording.dir")


def _check_oauth(oa: OAuthConfig, need: Callable[[bool, str, str], None]) -> None:
    """[oauth], checked only when enabled."""
    if not oa.enabled:
        return
    url = urlsplit(oa.jwks_url)
    need(url.scheme in ("http", "https") and bool(url.hostname), "oauth.jwks_url",
         f"must be an https:// URL of the OAuth server's JWK Set, got {oa.jwks_url[:100]!r}")
    need(url.scheme == "https" or url.hostname in ("127.0.0.1", "::1", "localhost"), "oauth.jwks_url",
         "must be https:// (plain http only on loopback): whoever can change the keys in transit "
         "can sign tokens the bridge accepts")
    need(bool(oa.issuer), "oauth.issuer", "must name the token issuer (the `iss` claim) when oauth is enabled")
    need(bool(oa.audience), "oauth.audience", "must name the audience (the `aud` claim) when oauth is enabled")
    need(bool(oa.algorithms), "oauth.algorithms", "must list at least one algorithm")
    for alg in oa.algorithms:
        need(alg in OAUTH_ALGORITHMS, "oauth.algorithms",
             f"{alg[:20]!r} is not allowed; allowed (asymmetric only): {', '.join(OAUTH_ALGORITHMS)}")
    need(0 <= oa.leeway_s <= 600, "oauth.leeway_s", "must be within 0..600")
    need(0 < oa.jwks_timeout_s <= 60, "oauth.jwks_timeout_s", "must be in (0, 60]")
    need(0.1 <= oa.jwks_min_refresh_s <= 3600, "oauth.jwks_min_refresh_s", "must be within 0.1..3600")
    need(oa.jwks_min_refresh_s <= oa.jwks_refresh_s <= 86400, "oauth.jwks_refresh_s",
         "must be within oauth.jwks_min_refresh_s..86400")


def load_secrets(env: Mapping[str, str] | None = None) -> Secrets:
    env = os.environ if env is None else env
    return Secrets(token=env.get("VOICEBRIDGE_TOKEN", ""),
                   openai_api_key=env.get("OPENAI_API_KEY", ""),
                   azure_api_key=env.get("AZURE_OPENAI_API_KEY", ""),
                   admin_token=env.get("VOICEBRIDGE_ADMIN_TOKEN", ""),
                   webhook_secret=env.get("VOICEBRIDGE_WEBHOOK_SECRET", ""))


def load_config(path: str | Path | None, env: Mapping[str, str] | None = None,
                overrides: Mapping[str, Any] | None = None) -> tuple[Config, Secrets]:
    """Read, merge and validate. `overrides` (tests, demo) is a nested dict applied last."""
    env = os.environ if env is None else env
    raw: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        try:
            raw = tomllib.loads(p.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"{p}: config file not found") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{p}: not valid TOML: {e}") from None
        except UnicodeDecodeError as e:
            raise ConfigError(f"{p}: not UTF-8 text: {e.reason} at byte {e.start}") from None
        except OSError as e:          # not readable (permissions), a directory, ...
            raise ConfigError(f"{p}: cannot read the config file: {e.strerror or e}") from None
    _find_secret_keys(raw)
    _apply_env(raw, env)
    for section, values in (overrides or {}).items():
        if isinstance(values, dict):
            tgt = raw.setdefault(section, {})
            for k, v in values.items():
                if isinstance(v, dict):
                    tgt.setdefault(k, {}).update(v)
                else:
                    tgt[k] = v
        else:
            raw[section] = values
    try:
        cfg = msgspec.convert(raw, Config)
    except msgspec.ValidationError as e:
        raise ConfigError(_path_of(e)) from None
    secrets = load_secrets(env)
    tokens = {label: env.get(m.authorization_env, "") for label, m in cfg.mcp.items() if m.authorization_env}
    if tokens:
        secrets = msgspec.structs.replace(secrets, mcp_tokens=tokens)
    _check(cfg, secrets)
    return cfg, secrets
