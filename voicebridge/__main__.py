"""CLI: `voicebridge --config config.toml` (or `python -m voicebridge`): load config, run on uvloop."""

from __future__ import annotations

import argparse
import sys

import uvloop

from . import __version__
from .config import ConfigError, load_config
from .log import get_logger, setup
from .server import Bridge


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="voicebridge", description=(
        "AudioCodes VoiceAI Connect (Bot API, WebSocket mode) <-> OpenAI Realtime bridge. "
        "Secrets come from the environment: VOICEBRIDGE_TOKEN, OPENAI_API_KEY, AZURE_OPENAI_API_KEY."))
    ap.add_argument("--config", default="config.toml", help="path to config.toml (default: %(default)s)")
    ap.add_argument("--check", action="store_true", help="validate the configuration and exit")
    ap.add_argument("--version", action="version", version=f"voicebridge {__version__}")
    args = ap.parse_args(argv)
    try:
        cfg, secrets = load_config(args.config)
    except ConfigError as e:
        print(f"voicebridge: invalid configuration: {e}", file=sys.stderr)
        return 2
    key_env = "OPENAI_API_KEY" if cfg.openai.provider == "openai" else "AZURE_OPENAI_API_KEY"
    has_key = bool(secrets.openai_api_key if cfg.openai.provider == "openai" else secrets.azure_api_key)
    if args.check:
        if not has_key:
            print(f"voicebridge: invalid configuration: openai.provider = {cfg.openai.provider!r} "
                  f"needs {key_env} in the environment", file=sys.stderr)
            return 2
        print(f"configuration OK ({args.config})")
        return 0
    setup(cfg.log.level, rate_limit_per_s=cfg.log.rate_limit_per_s)
    if not has_key:
        get_logger().warning("config.no_api_key", provider=cfg.openai.provider,
                             hint=f"set {key_env}; calls will fail to connect")
    try:
        uvloop.run(Bridge(cfg, secrets, config_path=args.config).serve_forever())
    except OSError as e:  # e.g. the port is in use: one clear line, not a traceback
        get_logger().error("server.start_failed", error=str(e)[:200], host=cfg.server.host,
                           port=cfg.server.port, admin_port=cfg.server.admin_port)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
