"""Scale-out behind HAProxy (deploy/haproxy.cfg, bench/scaleout.py, `make scaleout`).

Without haproxy: what the shipped configuration promises (leastconn, the tunnel timeout, the
health check on /ready with no session shutdown when an instance goes DOWN, L7 retries of a
drain's 503), how the local configuration is made from it, and that the run's checker catches a
cut call, a lost frame and a call that landed on the draining instance. Where haproxy is
installed (`make scaleout` installs Debian's package): `haproxy -c` accepts the shipped file and
the rendered one, and a small scale-out (2 instances, 10 calls, one drained) passes.
"""

from __future__ import annotations

import copy
import datetime as dt
import re
import sys
import tomllib
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))   # bench/ is not an installed package

from bench import scaleout as so  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = ROOT / "deploy" / "haproxy.cfg"
HAPROXY = so.haproxy_binary()
needs_haproxy = pytest.mark.skipif(
    HAPROXY is None, reason="haproxy is not installed (`make scaleout` installs Debian's haproxy package)")


def _section(text: str, header: str) -> list[list[str]]:
    """The directive lines (split into words, comments dropped) of one section."""
    for head, body in so._split_sections(text):
        if head.strip() == header:
            return [ln.split("#", 1)[0].split() for ln in body if ln.split("#", 1)[0].strip()]
    raise AssertionError(f"no section {header!r}")


def _seconds(value: str) -> float:
    m = re.fullmatch(r"(\d+)(us|ms|s|m|h|d)?", value)
    assert m, value
    unit = {"us": 1e-6, "ms": 1e-3, None: 1e-3, "s": 1, "m": 60, "h": 3600, "d": 86400}[m.group(2)]
    return int(m.group(1)) * unit


# ----------------------------------------------------------------------------- the shipped file
def test_shipped_cfg_balances_calls_and_keeps_them_through_a_drain():
    text = SHIPPED.read_text()
    config = tomllib.loads((ROOT / "config.toml").read_text())
    defaults = _section(text, "defaults")
    backend = _section(text, "backend voicebridge")
    timeouts = {w[1]: _seconds(w[2]) for w in defaults if w[0] == "timeout"}
    # the tunnel (after the 101) outlives any call; above all it must never fire before the
    # bridge's own keepalive and idle hang-up would
    assert timeouts["tunnel"] >= 3600, timeouts
    assert timeouts["tunnel"] > config["server"]["ping_interval_s"] + config["call"]["idle_timeout_s"]
    assert ["balance", "leastconn"] in backend
    assert ["option", "httpchk"] in backend
    send = next(w for w in backend if w[:2] == ["http-check", "send"])
    assert send[send.index("uri") + 1] in ("/ready", "/health"), send
    assert ["http-check", "expect", "status", "200"] in backend
    flat = [" ".join(w) for w in backend]
    assert not any("on-marked-down" in ln or "observe" in ln for ln in flat), flat
    retry_on = next(w for w in backend if w[0] == "retry-on")
    assert "503" in retry_on and "conn-failure" in retry_on, retry_on
    assert any(w[:2] == ["option", "redispatch"] for w in backend)
    default_server = next(w for w in backend if w[0] == "default-server")
    assert "check" in default_server
    fall = int(default_server[default_server.index("fall") + 1])
    assert fall >= 1
    servers = [w for w in backend if w[0] == "server"]
    assert len(servers) >= 2
    # only the bot path reaches the instances, and it is the one the daemon serves
    front = " ".join(" ".join(w) for w in _section(text, "frontend vaic"))
    assert f"path {config['server']['path']}" in front
    assert re.search(r"bind \S+ ssl crt \S+", front), "VAIC needs wss: TLS ends at HAProxy"


def test_render_replaces_binds_and_servers_and_keeps_the_rules(tmp_path):
    text = SHIPPED.read_text()
    sock = tmp_path / "h.sock"
    out = so.render_haproxy_cfg(text, front_port=4101, servers=[("a", 4201), ("b", 4202), ("c", 4203)],
                                stats_socket=sock, extra_ports=[4301, 4302])
    assert _section(out, "defaults") == _section(text, "defaults")
    backend, shipped = _section(out, "backend voicebridge"), _section(text, "backend voicebridge")
    assert [w for w in backend if w[0] != "server"] == [w for w in shipped if w[0] != "server"]
    opts = next(w for w in shipped if w[0] == "server")[3:]
    assert [w for w in backend if w[0] == "server"] == [
        ["server", n, f"127.0.0.1:{p}", *opts] for n, p in (("a", 4201), ("b", 4202), ("c", 4203))]
    front = _section(out, "frontend vaic")
    assert [w for w in front if w[0] == "bind"] == [["bind", "127.0.0.1:4101"]]
    assert [w for w in front if w[0] != "bind"] == [w for w in _section(text, "frontend vaic") if w[0] != "bind"]
    assert [w for w in _section(out, "frontend stats") if w[0] == "bind"] == [["bind", "127.0.0.1:4301"]]
    glob = _section(out, "global")
    assert not {w[0] for w in glob} & {"user", "group", "chroot", "daemon"}
    assert ["stats", "socket", str(sock), "mode", "600", "level", "admin"] in glob
    with pytest.raises(ValueError):
        so.render_haproxy_cfg("defaults\n    mode http\n", front_port=1, servers=[("a", 2)],
                              stats_socket=sock, extra_ports=[])


def _self_signed_pem(path: Path) -> None:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "bot.example.com")])
    now = dt.datetime.now(dt.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now)
            .not_valid_after(now + dt.timedelta(days=1)).sign(key, hashes.SHA256()))
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM) + key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))


@needs_haproxy
def test_haproxy_accepts_the_shipped_and_the_rendered_cfg(tmp_path):
    assert HAPROXY is not None
    pem = tmp_path / "voicebridge.pem"
    _self_signed_pem(pem)
    text = SHIPPED.read_text()
    crt = re.search(r"ssl crt (\S+)", text)
    assert crt
    shipped = tmp_path / "shipped.cfg"
    # as shipped, except the certificate path (and the chroot, which needs Debian's directory)
    shipped.write_text(text.replace(crt.group(1), str(pem)).replace("chroot /var/lib/haproxy", ""))
    ok, out = so.haproxy_check(HAPROXY, shipped)
    assert ok, out
    rendered = tmp_path / "rendered.cfg"
    rendered.write_text(so.render_haproxy_cfg(text, front_port=so.free_port(), servers=[("a", 1), ("b", 2)],
                                              stats_socket=tmp_path / "s.sock", extra_ports=[so.free_port()]))
    ok, out = so.haproxy_check(HAPROXY, rendered)
    assert ok, out


# ----------------------------------------------------------------------------- the checker
def _observed() -> so.Observed:
    """A run that passes: 4 calls on 2 instances, b drained after calls 0 and 1 started."""
    calls, started_on, ends, fake = [], {}, {}, {}
    for i, (where, t) in enumerate((("a", 10.0), ("b", 10.5), ("a", 12.0), ("a", 12.5))):
        c = so.CallRecord(idx=i, cid=f"c{i}", caller=f"+1555000000{i}", started_wall=t,
                          end_reason="caller-hangup", chunks_sent=270, chunks_received=24,
                          received_ms=[1200.0, 1200.0], turn_ms=[552.0, 553.0])
        calls.append(c)
        started_on[c.cid] = [where]
        ends[c.cid] = {"event": "call.end", "reason": "vaic_session_end", "frames_up": 270, "frames_down": 24}
        fake[c.caller] = so.FakeSide(appends=270, sent_ms=2400.0, responses=2, all_completed=True)
    return so.Observed(calls=calls, instances=["a", "b"], drained="b", draining_wall=11.0,
                       started_on=started_on, ends=ends, fake=fake,
                       drain_log={"calls_at_signal": 1, "drained": 1, "ended_by_timeout": 0,
                                  "drain_s": 4.0, "forced": False},
                       drained_exit=0, expected_turns=2)


def test_check_passes_a_clean_run_and_splits_calls_at_the_drain():
    o = _observed()
    assert so.check(o) == []
    assert so.split_by_drain(o) == ({"a": 1, "b": 1}, {"a": 2, "b": 0})


@pytest.mark.parametrize("spoil, expect", [
    (lambda o: o.started_on.__setitem__("c3", ["b"]), "landed on the draining b"),
    (lambda o: setattr(o.calls[1], "end_reason", "bot-hangup"), "cut"),
    (lambda o: setattr(o.calls[1], "bot_hangup", True), "cut"),
    (lambda o: setattr(o.calls[0], "connect_error", "HTTP 503"), "could not connect"),
    (lambda o: setattr(o.fake["+15550000002"], "appends", 269), "the fake got 269"),
    (lambda o: setattr(o.fake["+15550000002"], "sent_ms", 2500.0), "of bot audio"),
    (lambda o: o.ends["c2"].__setitem__("frames_down", 23), "daemon up/down"),
    (lambda o: o.ends["c1"].__setitem__("reason", "server_shutdown"), "the daemon ended it"),
    (lambda o: o.ends.pop("c0"), "no call.end"),
    (lambda o: setattr(o.calls[2], "turn_ms", [552.0]), "answered turns"),
    (lambda o: o.drain_log.__setitem__("ended_by_timeout", 1), "hung up by the drain"),
    (lambda o: o.drain_log.__setitem__("calls_at_signal", 0), "not exercised"),
    (lambda o: setattr(o, "drained_exit", 1), "exit status 1"),
    (lambda o: setattr(o, "draining_wall", None), "never logged server.draining"),
    (lambda o: [o.started_on.__setitem__(c, ["b"]) for c in ("c2", "c3")], "a took no call after"),
])
def test_check_reports_each_failure(spoil, expect):
    o = copy.deepcopy(_observed())
    spoil(o)
    failures = so.check(o)
    assert any(expect in f for f in failures), failures


# ----------------------------------------------------------------------------- the real thing
@needs_haproxy
async def test_small_scaleout_drains_one_instance_without_cutting_a_call():
    """2 instances behind HAProxy, 10 calls, the second instance SIGTERMed after 4: every call
    ends by its script with every frame, the calls after the drain all start on the first."""
    lines: list[str] = []
    status, figures = await so.run(so.Opts(instances=2, calls=10, spacing_s=0.4, drain_after=4,
                                           timeout_s=90.0, probe=False, log=lines.append))
    assert status == 0, so.report(figures)
    assert figures["failures"] == []
    assert figures["calls_after_drain"]["vb2"] == 0 and figures["calls_after_drain"]["vb1"] >= 1
    assert sum(figures["calls_before_drain"].values()) + sum(figures["calls_after_drain"].values()) == 10
    assert figures["drain"]["calls_at_signal"] >= 1 and figures["drain"]["ended_by_timeout"] == 0
    assert figures["frames_up"] > 0 and figures["frames_down"] > 0
