"""Scripts of the simulated VAIC caller: what the caller does, step by step.

:class:`Speak`, :class:`Silence`, :class:`WaitForBot`, :class:`BargeIn`,
:class:`DropAndResume`, :class:`Dtmf`, :class:`NoUserInput` and :class:`WaitForActivity`, the
default script and the parser of the CLI's ``--script`` text. Re-exported by
:mod:`voicebridge.sim.caller`.

"The caller's last input", which :class:`WaitForBot` and :class:`BargeIn` wait for an answer to,
is the end of the last Speak/BargeIn, the last digit of a Dtmf, a NoUserInput event, or the bot
activity a WaitForActivity waited for (whichever came last; call start before any).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

DTMF_DIGITS_RE = re.compile(r"^[0-9*#A-Da-d]+$")
DEFAULT_DTMF_GAP_MS = 200


@dataclass
class Speak:
    """The caller talks: ``ms`` of speech (300 Hz tone, amplitude 8000) in the accepted format."""

    ms: int


@dataclass
class Silence:
    """The caller is quiet: ``ms`` of digital silence."""

    ms: int


@dataclass
class WaitForBot:
    """Stream silence until the bot's answer has finished playing, or ``timeout_ms`` passed.

    "The bot's answer" is a play stream started at or after the caller's last input (module
    doc); done when such a stream is finished (stopped and played out or flushed) and nothing is
    left playing. A timeout is counted in ``CallResult.script_timeouts``.
    """

    timeout_ms: int = 10000


@dataclass
class BargeIn:
    """Stream silence until ``after_heard_ms`` of a bot stream has been heard, then ``Speak(ms)``.

    The stream must have started at or after the caller's last input (module doc). On timeout
    (counted in ``script_timeouts``) the caller speaks anyway.
    """

    after_heard_ms: int
    ms: int
    timeout_ms: int = 10000


@dataclass
class DropAndResume:
    """A network blip: stream ``after_ms`` of silence, then drop the TCP connection (abort, no
    close frame, no ``session.end``), wait ``gap_ms`` (no audio), open a new websocket (same URL
    and token) and send ``session.resume`` with the same ``conversationId``.

    ``session.accepted`` -> ``userStream.start`` again and the script goes on (the user stream's
    clock restarts, so no audio is sent to catch up the gap). ``session.error`` (or no answer
    within ``accept_timeout_s``, or a failed connect) ends the call. Either way the outcome is
    recorded in ``CallResult.resumes``. A bot stream playing at the drop is stopped then (the
    stop policy applies: with ``flush`` what was heard is frozen).
    """

    after_ms: int = 0
    gap_ms: int = 500


@dataclass
class Dtmf:
    """The caller presses keys: VAIC's ``DTMF`` events, ``{"type": "event", "name": "DTMF",
    "value": "5"}`` in an ``activities`` message.

    ``per_digit=True`` (VAIC's per-digit mode): one event per digit, ``gap_ms`` of silence
    streamed between two digits; ``False`` (collected mode): one event whose value is the whole
    string. Each event leaves when the user audio sent so far has been spoken (so it falls
    between two frames in real time). ``digits``: 0-9, ``*``, ``#`` and A-D; the bot's
    handling of A-D is its own business.
    """

    digits: str
    per_digit: bool = True
    gap_ms: int = DEFAULT_DTMF_GAP_MS

    def __post_init__(self) -> None:
        if not DTMF_DIGITS_RE.match(self.digits):
            raise ValueError(f"DTMF digits must be 0-9, *, # or A-D, not {self.digits!r}")
        if self.gap_ms < 0:
            raise ValueError("gap_ms must not be negative")


@dataclass
class NoUserInput:
    """VAIC's no-input timeout fired: ``{"type": "event", "name": "noUserInput", "value":
    count}`` (``count``: how many times in a row, from 1)."""

    count: int = 1

    def __post_init__(self) -> None:
        if self.count < 0:
            raise ValueError("count must not be negative")


@dataclass
class WaitForActivity:
    """Stream silence until the bot has sent the next activity event named ``name`` (case
    insensitive: ``transfer``, ``hangup``, ``sendDtmf``...), or ``timeout_ms`` passed (counted
    in ``script_timeouts``).

    "Next" counts: the k-th WaitForActivity for a name is satisfied by the k-th such activity of
    the call, even one that arrived before the item began (no race with a fast bot). Its
    arrival becomes the caller's last input, so a following WaitForBot waits for a stream
    started after it (e.g. ``activity:transfer,wait``: the answer after a failed transfer).
    """

    name: str
    timeout_ms: int = 10000


ScriptItem = (Speak | Silence | WaitForBot | BargeIn | DropAndResume | Dtmf | NoUserInput
              | WaitForActivity)


def default_script() -> list[ScriptItem]:
    """Listen to the greeting, say something for 1.5 s, listen to the answer."""
    return [WaitForBot(), Speak(1500), WaitForBot()]


_SCRIPT_HELP = (
    "speak:MS, silence:MS, wait[:TIMEOUT_MS], bargein:AFTER_MS:MS[:TIMEOUT_MS], "
    "resume:GAP_MS[:AFTER_MS], dtmf:DIGITS[:GAP_MS|:string], nouserinput[:COUNT], "
    "activity:NAME[:TIMEOUT_MS]"
)


def _parse_item(name: str, args: list[str]) -> ScriptItem:
    if name == "dtmf" and len(args) in (1, 2):
        if len(args) == 2 and args[1] == "string":
            return Dtmf(args[0], per_digit=False)
        return Dtmf(args[0], gap_ms=int(args[1]) if len(args) == 2 else DEFAULT_DTMF_GAP_MS)
    if name == "activity" and len(args) in (1, 2) and args[0]:
        return WaitForActivity(args[0], *(int(a) for a in args[1:]))
    nums = [int(a) for a in args]
    if name == "speak" and len(nums) == 1:
        return Speak(nums[0])
    if name == "silence" and len(nums) == 1:
        return Silence(nums[0])
    if name == "wait" and len(nums) <= 1:
        return WaitForBot(*nums)
    if name == "bargein" and len(nums) in (2, 3):
        return BargeIn(*nums)
    if name == "resume" and len(nums) in (1, 2):
        return DropAndResume(gap_ms=nums[0], after_ms=nums[1] if len(nums) > 1 else 0)
    if name == "nouserinput" and len(nums) <= 1:
        return NoUserInput(*nums)
    raise ValueError


def parse_script(text: str) -> list[ScriptItem]:
    """Parse ``"speak:1500,silence:2000,bargein:800:1200,wait,dtmf:123#,activity:transfer"``.

    Items: ``speak:MS``, ``silence:MS``, ``wait[:TIMEOUT_MS]``,
    ``bargein:AFTER_MS:MS[:TIMEOUT_MS]``, ``resume:GAP_MS[:AFTER_MS]`` (:class:`DropAndResume`),
    ``dtmf:DIGITS[:GAP_MS]`` (per digit, ``GAP_MS`` between digits, default 200) or
    ``dtmf:DIGITS:string`` (one collected event), ``nouserinput[:COUNT]`` (default 1),
    ``activity:NAME[:TIMEOUT_MS]`` (:class:`WaitForActivity`).
    Raises ``ValueError`` with the offending item on bad input.
    """
    items: list[ScriptItem] = []
    for raw in text.split(","):
        token = raw.strip()
        if not token:
            continue
        name, *args = token.split(":")
        try:
            items.append(_parse_item(name.lower(), args))
        except ValueError:
            raise ValueError(f"bad script item {token!r}; use {_SCRIPT_HELP}") from None
    return items
