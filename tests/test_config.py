"""Configuration: the shipped file loads, env overrides apply, errors name the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from voicebridge.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parent.parent
OK_ENV = {"VOICEBRIDGE_TOKEN": "t0k"}


def test_shipped_config_loads():
    cfg, secrets = load_config(ROOT / "config.toml", env=OK_ENV)
    assert cfg.server.path == "/voicebridge" and cfg.openai.model == "gpt-realtime"
    assert cfg.audio.format_preference[0] == "raw/lpcm16_24"
    assert secrets.token == "t0k" and "t0k" not in repr(secrets)


def test_env_overrides_are_typed():
    env = {**OK_ENV, "VOICEBRIDGE_SERVER_PORT": "9001", "VOICEBRIDGE_OPENAI_MODEL": "gpt-realtime-mini",
           "VOICEBRIDGE_OPENAI_VAD_THRESHOLD": "0.7",
           "VOICEBRIDGE_AUDIO_FORMAT_PREFERENCE": '["raw/mulaw"]'}
    cfg, _ = load_config(ROOT / "config.toml", env=env)
    assert cfg.server.port == 9001 and cfg.openai.model == "gpt-realtime-mini"
    assert cfg.openai.vad.threshold == 0.7 and cfg.audio.format_preference == ["raw/mulaw"]


@pytest.mark.parametrize("toml, env, key", [
    ("[server]\nport = 70000\n", OK_ENV, "server.port"),
    ("[server]\nprot = 1\n", OK_ENV, "server"),
    ("[server]\nport = 'x'\n", OK_ENV, "server.port"),
    ("[audio]\nformat_preference = ['raw/opus']\n", OK_ENV, "audio.format_preference"),
    ("[audio]\nvaic_stop_policy = 'maybe'\n", OK_ENV, "audio.vaic_stop_policy"),
    ("[openai]\nprovider = 'azure'\n", OK_ENV, "openai.azure_endpoint"),
    ("[openai]\nurl = 'wss://x/v1/realtime?model=a'\n", OK_ENV, "openai.url"),
    ("[openai]\nclose_timeout_s = 5\n", OK_ENV, "openai.close_timeout_s"),
    ("[openai.vad]\nthreshold = 2\n", OK_ENV, "openai.vad.threshold"),
    ("[server]\ntoken = 'abc'\n", OK_ENV, "server.token"),
    ("", {}, "server.allow_unauthenticated"),
    ("", {**OK_ENV, "VOICEBRIDGE_NOPE_X": "1"}, "VOICEBRIDGE_NOPE_X"),
    ("[server\n", OK_ENV, "not valid TOML"),
    # values that used to load and then broke the daemon (found in review)
    ("[server]\nping_interval_s = 0\n", OK_ENV, "server.ping_interval_s"),
    ("[server]\nping_interval_s = nan\n", OK_ENV, "server.ping_interval_s"),
    ("[server]\npath = '/metrics'\n", OK_ENV, "server.path"),
    ("[server]\npath = '/vb?x=1'\n", OK_ENV, "server.path"),
    ("[log]\nrate_limit_per_s = 0.5\n", OK_ENV, "log.rate_limit_per_s"),
    ("[server]\nmax_calls = 0\n", OK_ENV, "server.max_calls"),
    ("[server]\nrecv_queue_bytes = 1000\n", OK_ENV, "server.recv_queue_bytes"),
])
def test_invalid_config_names_the_key(tmp_path, toml, env, key):
    f = tmp_path / "c.toml"
    f.write_text(toml)
    with pytest.raises(ConfigError) as e:
        load_config(f, env=env)
    assert key in str(e.value)


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.toml", env=OK_ENV)


def test_cli_check_reports_bad_config(tmp_path, capsys):
    from voicebridge.__main__ import main
    f = tmp_path / "c.toml"
    f.write_text("[server]\nport = -1\n")
    assert main(["--config", str(f)]) == 2
    assert "server.port" in capsys.readouterr().err


def test_raw_formats_come_before_wav_by_default_and_in_the_shipped_file():
    from voicebridge.config import AudioConfig
    pref = AudioConfig().format_preference
    assert max(i for i, f in enumerate(pref) if f.startswith("raw/")) < min(
        i for i, f in enumerate(pref) if f.startswith("wav/"))
    shipped, _ = load_config(Path(__file__).parent.parent / "config.toml", env={"VOICEBRIDGE_TOKEN": "t"})
    assert shipped.audio.format_preference == pref


def test_the_commented_call_control_example_in_config_toml_is_valid():
    text = (ROOT / "config.toml").read_text()
    block = text[text.index("# Call control"):]
    lines = [ln[2:] if ln.startswith("# ") else ("" if ln.startswith("#") else ln)
             for ln in block.splitlines()[2:]]
    body = "\n".join(lines).split("\n[mcp.crm]")[0]      # MCP needs its token in the environment
    cfg, _ = load_config(None, env={"VOICEBRIDGE_TOKEN": "t"}, overrides=__import__("tomllib").loads(body))
    assert set(cfg.profiles) == {"default", "sales"} and "order_status" in cfg.webhooks
