"""CLI: `voicebridge --config config.toml` (or `python -m voicebridge`): load config, run on uvloop."""

from __future__ import annotations

import argparse
import sys

import structlog
import uvloop

from . import __version__
from .config import ConfigError, load_config, worker_count
from .log import get_logger, setup
from .server import Bridge


def _parse_worker(spec: str) -> tuple[int, int, int]:
    """`--worker slot:gen:workers` (set by the supervisor)."""
    slot, gen, n = (int(x) for x in spec.split(":"))
    if not (0 <= slot < n and gen >= 1):
        raise ValueError(spec)
    return slot, gen, n


def _whole_lines() -> None:
    """Several processes share stdout (the journal): each log line must leave in one write.
    print() writes the text and the newline separately, which is two writes unbuffered
    (PYTHONUNBUFFERED); line buffering joins them."""
    reconfigure = getattr(sys.stdout, "reconfigure", None)
    if reconfigure is not None:
        reconfigure(line_buffering=True, write_through=False)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="voicebridge", description=(
        "AudioCodes VoiceAI Connect (Bot API, WebSocket mode) <-> OpenAI Realtime bridge. "
        "Secrets come from the environment: VOICEBRIDGE_TOKEN, OPENAI_API_KEY, AZURE_OPENAI_API_KEY."))
    ap.add_argument("--config", default="config.toml", help="path to config.toml (default: %(default)s)")
    ap.add_argument("--check", action="store_true", help="validate the configuration and exit")
    ap.add_argument("--version", action="version", version=f"voicebridge {__version__}")
    # set by the supervisor (server.workers > 1) on the worker processes it starts
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--run-dir", help=argparse.SUPPRESS)
    ap.add_argument("--supervisor-pid", type=int, default=0, help=argparse.SUPPRESS)
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
    workers = worker_count(cfg.server)
    worker = None
    if args.worker is not None:            # one worker of a supervisor (supervisor.py)
        from .supervisor import die_with_parent
        from .worker import WorkerLink
        try:
            slot, gen, workers = _parse_worker(args.worker)
        except ValueError:
            print(f"voicebridge: bad --worker {args.worker[:40]!r}", file=sys.stderr)
            return 2
        if not args.run_dir or not die_with_parent(args.supervisor_pid):
            return 1                       # the supervisor is already gone
        worker = WorkerLink(args.run_dir, slot, gen, workers)
        structlog.contextvars.bind_contextvars(worker=slot)   # every line says which worker
        _whole_lines()
    elif workers > 1:                      # the supervisor: starts the workers, binds nothing
        from . import supervisor
        _whole_lines()
        setup(cfg.log.level, rate_limit_per_s=cfg.log.rate_limit_per_s)
        if not has_key:
            get_logger().warning("config.no_api_key", provider=cfg.openai.provider,
                                 hint=f"set {key_env}; calls will fail to connect")
        return supervisor.run(cfg, args.config, workers)
    setup(cfg.log.level, rate_limit_per_s=cfg.log.rate_limit_per_s)
    if not has_key and worker is None:
        get_logger().warning("config.no_api_key", provider=cfg.openai.provider,
                             hint=f"set {key_env}; calls will fail to connect")
    try:
        uvloop.run(Bridge(cfg, secrets, config_path=args.config, worker=worker).serve_forever())
    except OSError as e:  # e.g. the port is in use: one clear line, not a traceback
        get_logger().error("server.start_failed", error=str(e)[:200], host=cfg.server.host,
                           port=cfg.server.port, admin_port=cfg.server.admin_port)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
