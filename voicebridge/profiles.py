"""Per-call profiles: what the agent is for a given called number or bot, resolved once per call.

Configuration (`config.toml`):
- `[profiles.<name>]` tables, in file order. A profile matches a call by `match_callee` (the
  called number from VAIC's `start` activity: an exact number, a prefix ending in `*`, or a
  regular expression written `re:<pattern>`, matched in full) or by `match_bot` (the bot name of
  `session.initiate`, exact). The first matching profile in file order wins; `default` (a
  profile of that name, optional) applies when none matches and is what every other profile
  inherits from. Every setting a profile leaves out comes from `default`, then from the global
  `[openai]` / `[call]` sections.
- `[webhooks.<name>]`: HTTP tools the bridge runs itself; `[mcp.<label>]`: OpenAI-side remote
  MCP servers. A profile enables them by name in `tools`, next to the call tools `end_call`,
  `transfer_call` and `send_dtmf`.

Timing: the callee arrives only with the `start` activity, after the OpenAI dial has begun. A
call therefore first gets the profile its bot name selects (`select(..., callee="")`), used
for the dial and the first `session.update`; at `start` the final selection is made, and if it
differs the session core sends a second `session.update` with that profile's settings before the
first response (the voice only while no audio has been produced yet).

Everything here is pure: structs, validation with messages naming the profile and key,
resolution, selection and the instructions' placeholders.
"""

from __future__ import annotations

import re
from typing import Any, Callable, Literal, Mapping

import msgspec

CALL_TOOLS = ("end_call", "transfer_call", "send_dtmf")
FALLBACKS_HELP = "'hangup' or 'transfer:<target name>'"
_NAME_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
# placeholders in instructions / greeting / closing text: {caller}, {callee}, {bot},
# {conversation_id}, {profile}, and {param.NAME} for any parameter of the `start` activity
PLACEHOLDERS = ("caller", "callee", "bot", "conversation_id", "profile")
_PLACEHOLDER_RE = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z0-9_-]+)?)\}")
MAX_PARAM_CHARS = 200


class TransferTarget(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """A place the agent may hand the call to. The model picks one by its name (the table key),
    never by number."""
    uri: str                      # sent as transferTarget: "tel:+4930...", "sip:queue@pbx"
    description: str = ""         # tells the model when to choose it


class DtmfConfig(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """Keypad input: `off` (ignored), `digit` (each digit is a turn), `collect` (digits are
    gathered until `terminator` or `pause_ms` without a digit, then one turn)."""
    mode: Literal["off", "digit", "collect"] = "collect"
    terminator: str = "#"
    pause_ms: int = 2000
    max_digits: int = 32


class WebhookTool(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """A function tool the bridge executes: POST the JSON arguments to `url`, the JSON answer
    becomes the function_call_output. The shared secret is `VOICEBRIDGE_WEBHOOK_SECRET` (sent as
    `Authorization: Bearer ...`), never in the file."""
    url: str
    description: str
    parameters: dict[str, Any] = msgspec.field(
        default_factory=lambda: {"type": "object", "properties": {}})
    timeout_s: float = 5.0
    max_response_bytes: int = 65536


class McpServer(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """An OpenAI remote MCP server: passed to the model in session.update; OpenAI calls it.
    `authorization_env` names an environment variable holding its OAuth token (optional)."""
    server_url: str
    description: str = ""
    allowed_tools: list[str] = []
    require_approval: Literal["never"] = "never"   # no one on a phone call can approve
    authorization_env: str = ""


class ProfileConfig(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """One `[profiles.<name>]` table. None: inherited (from `default`, then the global sections)."""
    match_callee: list[str] = []
    match_bot: list[str] = []
    instructions: str | None = None
    voice: str | None = None
    greeting: str | None = None            # "": the caller speaks first
    transcription_model: str | None = None
    noise_reduction: Literal["", "near_field", "far_field"] | None = None
    vad: dict[str, Any] | None = None      # keys of [openai.vad]; merged over the inherited ones
    tools: list[str] | None = None
    transfer_targets: dict[str, TransferTarget] | None = None
    max_duration_s: float | None = None    # 0: no limit
    closing_instructions: str | None = None
    closing_grace_s: float | None = None
    fallback: str | None = None            # the model is unreachable: 'hangup' | 'transfer:<target>'
    dtmf: dict[str, Any] | None = None     # keys of DtmfConfig; merged over the inherited ones
    no_user_input: Literal["ignore", "prompt", "hangup"] | None = None
    no_user_input_prompt: str | None = None
    no_user_input_max: int | None = None   # this many noUserInput events: hang up
    play_finished: bool | None = None      # VAIC sends playFinished (sendEventsToBot) on this bot
    transcripts: bool | None = None        # JSONL transcript file (needs [transcripts] dir)
    record: bool | None = None             # wire recording (needs [recording] dir)


class TranscriptsConfig(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    dir: str = ""                          # "": no files; the log events are always written
    retention_days: float = 30.0
    log_text: bool = True                  # False: the call.transcript log events omit the words


DEFAULT_CLOSING = ("The maximum call time has been reached. Tell the caller briefly and "
                   "politely that the call has to end now, and say goodbye.")
DEFAULT_NO_INPUT = "The caller has been silent for a while. Ask briefly whether they are still there."


class CallProfile(msgspec.Struct, frozen=True):
    """A profile with everything inherited filled in: what one call runs with."""
    name: str
    instructions: str
    voice: str
    greeting: str
    transcription_model: str
    noise_reduction: str
    vad: Any                      # config.VadConfig
    tools: tuple[str, ...]
    transfer_targets: dict[str, TransferTarget]
    max_duration_s: float
    closing_instructions: str
    closing_grace_s: float
    fallback: str
    dtmf: DtmfConfig
    no_user_input: str
    no_user_input_prompt: str
    no_user_input_max: int
    play_finished: bool
    transcripts: bool
    record: bool
    webhooks: dict[str, WebhookTool]
    mcp: dict[str, McpServer]
    match_callee: tuple[str, ...] = ()
    match_bot: tuple[str, ...] = ()

    def has(self, tool: str) -> bool:
        return tool in self.tools


class ProfileError(ValueError):
    """A profile setting is invalid; the message names `profiles.<name>.<key>`."""


# ------------------------------------------------------------------------------ resolution


def _base(openai: Any) -> dict[str, Any]:
    """The global settings every profile starts from (`[openai]`)."""
    vad = msgspec.structs.asdict(openai.vad)
    return dict(instructions=openai.instructions, voice=openai.voice, greeting=openai.greeting,
                transcription_model=openai.transcription_model,
                noise_reduction=openai.noise_reduction, vad=vad, tools=(),
                transfer_targets={}, max_duration_s=0.0, closing_instructions=DEFAULT_CLOSING,
                closing_grace_s=15.0, fallback="hangup", dtmf=msgspec.structs.asdict(DtmfConfig()),
                no_user_input="ignore", no_user_input_prompt=DEFAULT_NO_INPUT,
                no_user_input_max=3, play_finished=False, transcripts=False, record=False)


def _overlay(into: dict[str, Any], p: ProfileConfig) -> None:
    for f in msgspec.structs.fields(ProfileConfig):
        if f.name in ("match_callee", "match_bot"):
            continue
        v = getattr(p, f.name)
        if v is None:
            continue
        if f.name in ("vad", "dtmf"):
            into[f.name] = {**into[f.name], **v}
        elif f.name == "tools":
            into["tools"] = tuple(v)
        else:
            into[f.name] = v


def resolve(profiles: Mapping[str, ProfileConfig], openai: Any,
            webhooks: Mapping[str, WebhookTool], mcp: Mapping[str, McpServer]) -> dict[str, CallProfile]:
    """Every profile with inheritance applied, in file order; always contains `default`."""
    from .config import VadConfig      # config imports this module: the struct at call time
    base = _base(openai)
    if "default" in profiles:
        _overlay(base, profiles["default"])
    out: dict[str, CallProfile] = {}
    names = [n for n in profiles if n != "default"] + ["default"]
    for name in names:
        d = dict(base)
        p = profiles.get(name)
        if p is not None and name != "default":
            _overlay(d, p)
        tools = d["tools"]
        d["vad"] = msgspec.convert(d["vad"], VadConfig)
        d["dtmf"] = msgspec.convert(d["dtmf"], DtmfConfig)
        out[name] = CallProfile(
            name=name, webhooks={t: webhooks[t] for t in tools if t in webhooks},
            mcp={t: mcp[t] for t in tools if t in mcp},
            match_callee=tuple(p.match_callee) if p else (),
            match_bot=tuple(p.match_bot) if p else (), **d)
    return out


def _matches_callee(rule: str, callee: str) -> bool:
    if rule.startswith("re:"):
        return re.fullmatch(rule[3:], callee) is not None
    if rule.endswith("*"):
        return callee.startswith(rule[:-1])
    return callee == rule


def select(profiles: Mapping[str, CallProfile], callee: str, bot: str) -> CallProfile:
    """The first profile (file order) whose `match_callee` matches `callee` or whose
    `match_bot` contains `bot`; `default` otherwise."""
    for p in profiles.values():
        if p.name == "default":
            continue
        if callee and any(_matches_callee(r, callee) for r in p.match_callee):
            return p
        if bot and bot in p.match_bot:
            return p
    return profiles["default"]


def render(template: str, fields: Mapping[str, str], params: Mapping[str, Any]) -> str:
    """Fill the placeholders; `{param.X}` from the `start` activity's parameters (strings and
    numbers only, clipped), unknown parameters become empty."""
    if "{" not in template:
        return template

    def sub(m: re.Match[str]) -> str:
        key = m.group(1)
        if key.startswith("param."):
            v = params.get(key[6:])
            if isinstance(v, bool) or not isinstance(v, (str, int, float)):
                return ""
            return str(v)[:MAX_PARAM_CHARS]
        return fields.get(key, m.group(0))
    return _PLACEHOLDER_RE.sub(sub, template)


# ------------------------------------------------------------------------------ validation


def _placeholders_ok(text: str, key: str, need: Callable[[bool, str, str], None]) -> None:
    for m in _PLACEHOLDER_RE.finditer(text):
        k = m.group(1)
        need(k in PLACEHOLDERS or k.startswith("param."), key,
             f"unknown placeholder {{{k}}}; known: "
             + ", ".join("{" + p + "}" for p in PLACEHOLDERS) + ", {param.NAME}")


def check(profiles: Mapping[str, ProfileConfig], webhooks: Mapping[str, WebhookTool],
          mcp: Mapping[str, McpServer], openai: Any,
          need: Callable[[bool, str, str], None]) -> None:
    """Validate `[profiles.*]`, `[webhooks.*]` and `[mcp.*]`; `need(ok, key, why)` raises."""
    for name, w in webhooks.items():
        k = f"webhooks.{name}"
        need(_NAME_RE.match(name) is not None and name not in CALL_TOOLS, k,
             "a tool name is 1-64 letters, digits, _ or -, and not a call tool's name")
        need(w.url.startswith(("https://", "http://")), f"{k}.url", "must be an http(s):// URL")
        need(bool(w.description.strip()), f"{k}.description", "must tell the model what the tool does")
        need(w.parameters.get("type") == "object", f"{k}.parameters",
             "must be a JSON schema of type 'object'")
        need(0 < w.timeout_s <= 30, f"{k}.timeout_s", "must be in (0, 30]: the caller is waiting")
        need(1024 <= w.max_response_bytes <= 1_048_576, f"{k}.max_response_bytes",
             "must be within 1024..1048576")
    for label, m in mcp.items():
        k = f"mcp.{label}"
        need(_NAME_RE.match(label) is not None and label not in CALL_TOOLS and label not in webhooks,
             k, "a label is 1-64 letters, digits, _ or -, unique among tool names")
        need(m.server_url.startswith("https://"), f"{k}.server_url", "must be an https:// URL")
    for name, p in profiles.items():
        k = f"profiles.{name}"
        need(_NAME_RE.match(name) is not None, k, "a profile name is 1-64 letters, digits, _ or -")
        if name == "default":
            need(not p.match_callee and not p.match_bot, f"{k}.match_callee",
                 "the default profile matches every call: it takes no match rules")
        else:
            need(bool(p.match_callee or p.match_bot), f"{k}.match_callee",
                 "a profile needs match_callee or match_bot (else it is never selected)")
        for rule in p.match_callee:
            need(bool(rule) and len(rule) <= 200, f"{k}.match_callee", f"empty or too long rule {rule[:40]!r}")
            if rule.startswith("re:"):
                try:
                    re.compile(rule[3:])
                except re.error as e:
                    need(False, f"{k}.match_callee", f"{rule[:60]!r} is not a valid regular expression: {e}")
        if p.dtmf is not None:
            try:
                msgspec.convert({**msgspec.structs.asdict(DtmfConfig()), **p.dtmf}, DtmfConfig)
            except msgspec.ValidationError as e:
                need(False, f"{k}.dtmf", str(e).replace("$.", ""))
        if p.vad is not None:
            from .config import VadConfig      # the one home of the VAD keys and their checks
            try:
                msgspec.convert({**msgspec.structs.asdict(openai.vad), **p.vad}, VadConfig)
            except msgspec.ValidationError as e:
                need(False, f"{k}.vad", str(e).replace("$.", ""))
    for name, r in resolve(profiles, openai, webhooks, mcp).items():
        k = f"profiles.{name}"
        for key in ("instructions", "greeting", "closing_instructions", "no_user_input_prompt"):
            _placeholders_ok(getattr(r, key), f"{k}.{key}", need)
        for t in r.tools:
            need(t in CALL_TOOLS or t in webhooks or t in mcp, f"{k}.tools",
                 f"unknown tool {t[:64]!r}; known: {', '.join(list(CALL_TOOLS) + list(webhooks) + list(mcp))}")
        for tname, target in r.transfer_targets.items():
            need(_NAME_RE.match(tname) is not None, f"{k}.transfer_targets",
                 f"target name {tname[:64]!r}: 1-64 letters, digits, _ or -")
            need(target.uri.startswith(("tel:", "sip:", "sips:")), f"{k}.transfer_targets.{tname}.uri",
                 "must be a tel:, sip: or sips: URI")
        need("transfer_call" not in r.tools or bool(r.transfer_targets), f"{k}.transfer_targets",
             "transfer_call is enabled but no transfer target is named")
        need(r.fallback == "hangup" or (r.fallback.startswith("transfer:")
                                        and r.fallback[9:] in r.transfer_targets),
             f"{k}.fallback", f"must be {FALLBACKS_HELP} naming one of its transfer_targets")
        need(0 <= r.max_duration_s <= 86400, f"{k}.max_duration_s", "must be within 0..86400 (0: no limit)")
        need(1 <= r.closing_grace_s <= 120, f"{k}.closing_grace_s", "must be within 1..120")
        d = r.dtmf
        need(len(d.terminator) <= 1 and all(c in "0123456789*#" for c in d.terminator),
             f"{k}.dtmf.terminator", "must be one of 0-9 * # (or empty)")
        need(100 <= d.pause_ms <= 60000, f"{k}.dtmf.pause_ms", "must be within 100..60000")
        need(1 <= d.max_digits <= 64, f"{k}.dtmf.max_digits", "must be within 1..64")
        need(1 <= r.no_user_input_max <= 100, f"{k}.no_user_input_max", "must be within 1..100")


# ------------------------------------------------------------------------------ tools for OpenAI


def tool_definitions(p: CallProfile, mcp_tokens: Mapping[str, str]) -> list[dict[str, Any]]:
    """`session.tools` for this profile: the call tools it enables, its webhooks, its MCP
    servers (with their tokens from the environment)."""
    tools: list[dict[str, Any]] = []
    for name in p.tools:
        if name == "end_call":
            tools.append({"type": "function", "name": "end_call",
                          "description": "End the phone call. Say goodbye first, in the same turn; "
                                         "the line is closed once the caller has heard it.",
                          "parameters": {"type": "object", "properties": {
                              "reason": {"type": "string",
                                         "description": "why the call ends, in a few words"}},
                              "required": []}})
        elif name == "transfer_call":
            targets = p.transfer_targets
            desc = "; ".join(f"{n}: {t.description}" if t.description else n for n, t in targets.items())
            tools.append({"type": "function", "name": "transfer_call",
                          "description": "Transfer the caller to a human or another service. Tell the "
                                         "caller first, in the same turn. Targets: " + desc,
                          "parameters": {"type": "object", "properties": {
                              "target": {"type": "string", "enum": list(targets)},
                              "reason": {"type": "string",
                                         "description": "a short hand-over note for the agent"}},
                              "required": ["target"]}})
        elif name == "send_dtmf":
            tools.append({"type": "function", "name": "send_dtmf",
                          "description": "Send keypad tones (DTMF) on the line, e.g. to navigate a "
                                         "phone menu: digits 0-9, * and #, at most 20.",
                          "parameters": {"type": "object", "properties": {
                              "digits": {"type": "string", "pattern": "^[0-9*#]{1,20}$"}},
                              "required": ["digits"]}})
        elif name in p.webhooks:
            w = p.webhooks[name]
            tools.append({"type": "function", "name": name, "description": w.description,
                          "parameters": w.parameters})
        elif name in p.mcp:
            m = p.mcp[name]
            t: dict[str, Any] = {"type": "mcp", "server_label": name, "server_url": m.server_url,
                                 "require_approval": m.require_approval}
            if m.description:
                t["server_description"] = m.description
            if m.allowed_tools:
                t["allowed_tools"] = list(m.allowed_tools)
            token = mcp_tokens.get(name, "")
            if token:
                t["authorization"] = token
            tools.append(t)
    return tools


_cache: dict[int, tuple[Any, dict[str, CallProfile]]] = {}


def for_config(cfg: Any) -> dict[str, CallProfile]:
    """`resolve` for a loaded `Config`, computed once per configuration object (a reload makes a
    new one; the last few are kept)."""
    hit = _cache.get(id(cfg))
    if hit is not None and hit[0] is cfg:
        return hit[1]
    out = resolve(cfg.profiles, cfg.openai, cfg.webhooks, cfg.mcp)
    if len(_cache) >= 4:
        _cache.clear()
    _cache[id(cfg)] = (cfg, out)
    return out


def openai_settings(base: Any, p: CallProfile, instructions: str) -> Any:
    """The call's `OpenAIConfig`: the global one with the profile's model settings."""
    return msgspec.structs.replace(base, instructions=instructions, voice=p.voice, greeting=p.greeting,
                                   transcription_model=p.transcription_model,
                                   noise_reduction=p.noise_reduction, vad=p.vad)
