"""Fake OpenAI Realtime GA server for end-to-end tests, ``make demo`` and the load benchmark.

Split by idea: ``server`` (listener, handshake and auth, fault knobs, CLI), ``connection`` (one
session's protocol: client events, the input buffer and its VAD, items, the session limit),
``responses`` (scripted responses, barge-in, truncation), ``tools`` (scripted function and MCP
calls, MCP tool listing, the checks on the client's tool outputs and responses), ``usage`` (the
token ``usage`` of each response), ``validate`` (``session.update`` and client-event validation
against the GA shapes), ``audio`` (formats, tone, energy VAD) and ``records`` (the configuration
and what the fake records for tests to assert on).
``python -m voicebridge.sim.fake_openai --help`` runs it standalone.
"""

from voicebridge.sim.fake_openai.audio import _EnergyVad  # noqa: F401  tests reach it from here
from voicebridge.sim.fake_openai.server import *  # noqa: F401,F403
from voicebridge.sim.fake_openai.server import __all__, main  # noqa: F401
