"""Scripts of the simulated VAIC caller: what the caller does, step by step.

:class:`Speak`, :class:`Silence`, :class:`WaitForBot`, :class:`BargeIn` and
:class:`DropAndResume`, the default script and
the parser of the CLI's ``--script`` text. Re-exported by :mod:`voicebridge.sim.caller`.
"""

from __future__ import annotations

from dataclasses import dataclass


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

    "The bot's answer" is a play stream started at or after the end of the caller's last
    Speak/BargeIn (or call start); done when such a stream is finished (stopped and played out or
    flushed) and nothing is left playing. A timeout is counted in ``CallResult.script_timeouts``.
    """

    timeout_ms: int = 10000


@dataclass
class BargeIn:
    """Stream silence until ``after_heard_ms`` of a bot stream has been heard, then ``Speak(ms)``.

    The stream must have started at or after the end of the caller's last Speak/BargeIn (or call
    start). On timeout (counted in ``script_timeouts``) the caller speaks anyway.
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


ScriptItem = Speak | Silence | WaitForBot | BargeIn | DropAndResume


def default_script() -> list[ScriptItem]:
    """Listen to the greeting, say something for 1.5 s, listen to the answer."""
    return [WaitForBot(), Speak(1500), WaitForBot()]


def parse_script(text: str) -> list[ScriptItem]:
    """Parse ``"speak:1500,silence:2000,bargein:800:1200,wait"`` into script items.

    Items: ``speak:MS``, ``silence:MS``, ``wait[:TIMEOUT_MS]``, ``bargein:AFTER_MS:MS[:TIMEOUT_MS]``,
    ``resume:GAP_MS[:AFTER_MS]`` (:class:`DropAndResume`).
    Raises ``ValueError`` with the offending item on bad input.
    """
    items: list[ScriptItem] = []
    for raw in text.split(","):
        token = raw.strip()
        if not token:
            continue
        name, *args = token.split(":")
        try:
            nums = [int(a) for a in args]
            if name == "speak" and len(nums) == 1:
                items.append(Speak(nums[0]))
            elif name == "silence" and len(nums) == 1:
                items.append(Silence(nums[0]))
            elif name == "wait" and len(nums) <= 1:
                items.append(WaitForBot(*nums))
            elif name == "bargein" and len(nums) in (2, 3):
                items.append(BargeIn(*nums))
            elif name == "resume" and len(nums) in (1, 2):
                items.append(DropAndResume(gap_ms=nums[0], after_ms=nums[1] if len(nums) > 1 else 0))
            else:
                raise ValueError
        except ValueError:
            raise ValueError(
                f"bad script item {token!r}; use speak:MS, silence:MS, wait[:TIMEOUT_MS], "
                "bargein:AFTER_MS:MS[:TIMEOUT_MS], resume:GAP_MS[:AFTER_MS]"
            ) from None
    return items
