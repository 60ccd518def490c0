"""Tests of the simulated VAIC caller's call control: DTMF and noUserInput events, playFinished
with playedDurationMS, transfers (carried out or failed with transferStatus), sendDtmf, and the
record of every bot activity with the playout at its arrival.

Against a tiny in-test bot (helpers from ``test_caller_sim``); no timing thresholds.
"""

from __future__ import annotations

from typing import Any

import pytest
from websockets.asyncio.server import ServerConnection

from tests.test_caller_sim import PCM24, BotLog, accept, b64, bot_server, play, send
from voicebridge.sim.caller import (
    CallerConfig,
    Dtmf,
    NoUserInput,
    Silence,
    WaitForActivity,
    WaitForBot,
    format_timeline,
    main,
    parse_script,
    run_call,
)
from voicebridge.sim.playout_model import PlayoutModel

SECOND = [bytes(PCM24.bytes_for_ms(100))] * 10  # 1000 ms of bot audio in 10 chunks


async def expect_activity(ws: ServerConnection, log: BotLog, name: str) -> dict[str, Any]:
    """Read (and log) until an activity event ``name`` arrives; returns that activity."""
    while True:
        msg = await log.expect(ws, "activities")
        for act in msg["activities"]:
            if act.get("name") == name:
                return act


def activities(log: BotLog) -> list[dict[str, Any]]:
    return [a for m in log.of_type("activities") for a in m["activities"] if a["name"] != "start"]


async def bot_activity(ws: ServerConnection, name: str, **params: Any) -> None:
    event: dict[str, Any] = {"type": "event", "name": name}
    if params:
        event["activityParams"] = params
    await send(ws, {"type": "activities", "activities": [event]})


# -- pure parts ----------------------------------------------------------------------------


def test_parse_script_call_control_items() -> None:
    assert parse_script("dtmf:12#,dtmf:5*:40,dtmf:0#:string,nouserinput,nouserinput:3,"
                        "activity:transfer,activity:sendDtmf:500") == [
        Dtmf("12#"), Dtmf("5*", gap_ms=40), Dtmf("0#", per_digit=False), NoUserInput(1),
        NoUserInput(3), WaitForActivity("transfer"), WaitForActivity("sendDtmf", 500)]
    for bad in ("dtmf", "dtmf:12x", "dtmf:1:-5", "dtmf:1:soon", "nouserinput:a", "activity",
                "activity::5", "nouserinput:1:2"):
        with pytest.raises(ValueError, match="bad script item"):
            parse_script(bad)
    with pytest.raises(ValueError):
        Dtmf("")


def test_unplayed_lists_queued_audio_per_stream() -> None:
    m = PlayoutModel("drain")
    a = m.start(0.0, "a", "raw/lpcm16_24")
    m.chunk(0.0, 300.0)
    m.stop(10.0)
    b = m.start(20.0, "b", "raw/lpcm16_24")
    m.chunk(20.0, 100.0)
    assert m.unplayed(100.0) == [(a, 200.0), (b, 100.0)]
    assert m.unplayed(350.0) == [(b, 50.0)]
    assert m.unplayed(400.0) == []


def test_cli_knows_the_new_options(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    assert "--transfer-result" in out and "dtmf:DIGITS" in out and "nouserinput" in out


async def test_bad_transfer_config_is_refused_at_call_start() -> None:
    for bad in ("maybe", []):
        with pytest.raises(ValueError, match="transfer_result"):
            await run_call(CallerConfig("ws://127.0.0.1:1/", transfer_result=bad))  # type: ignore[arg-type]


# -- events the caller sends ---------------------------------------------------------------


async def test_dtmf_per_digit_collected_and_no_user_input() -> None:
    async def bot(ws: ServerConnection, log: BotLog) -> None:
        await accept(ws, log)
        await log.drain(ws)

    script = [Dtmf("12#", gap_ms=40), Dtmf("99", per_digit=False), NoUserInput(2), Silence(20)]
    async with bot_server(bot) as (url, log):
        result = await run_call(CallerConfig(url, script=script))
    assert result.violations == [] and result.end_reason == "caller-hangup"
    sent = activities(log)
    assert [(a["name"], a["value"]) for a in sent] == [
        ("DTMF", "1"), ("DTMF", "2"), ("DTMF", "#"), ("DTMF", "99"), ("noUserInput", 2)]
    assert all(a["type"] == "event" and a["id"] and a["timestamp"] for a in sent)
    assert [(s.name, s.value) for s in result.sent_activities] == [
        ("start", None), ("DTMF", "1"), ("DTMF", "2"), ("DTMF", "#"), ("DTMF", "99"), ("noUserInput", 2)]
    # 40 ms of silence (two 20 ms frames) between two digits, none before the first
    order = [m["type"] if m["type"] != "activities" else m["activities"][0]["name"] for m in log.messages]
    dtmf_at = [i for i, kind in enumerate(order) if kind == "DTMF"]
    assert order[dtmf_at[0] - 1] == "userStream.start"
    assert [dtmf_at[1] - dtmf_at[0] - 1, dtmf_at[2] - dtmf_at[1] - 1, dtmf_at[3] - dtmf_at[2] - 1] == [2, 2, 0]
    assert order[dtmf_at[3] + 2:dtmf_at[3] + 3] == ["userStream.chunk"]  # then the script's Silence
    assert result.chunks_sent == 2 + 2 + 1


async def test_play_finished_reports_played_ms_per_stream() -> None:
    async def bot(ws: ServerConnection, log: BotLog) -> None:
        await accept(ws, log)
        await play(ws, "1", SECOND[:3])
        await expect_activity(ws, log, "playFinished")
        await play(ws, "2", SECOND[:2])
        await log.drain(ws)

    async with bot_server(bot) as (url, log):
        cfg = CallerConfig(url, script=[WaitForBot(3000), Silence(20), WaitForBot(3000)],
                           stop_policy="drain", play_finished=True)
        result = await run_call(cfg)
    assert result.violations == [] and result.script_timeouts == 0
    finished = [a for a in activities(log) if a["name"] == "playFinished"]
    assert [a["value"] for a in finished] == [{"playedDurationMS": 300, "status": "finished"},
                                              {"playedDurationMS": 200, "status": "finished"}]
    assert [(s.stream_id, s.value["playedDurationMS"]) for s in result.sent_named("playFinished")] == [
        ("1", round(result.streams[0].heard_ms)), ("2", round(result.streams[1].heard_ms))]
    for sent, stream in zip(result.sent_named("playFinished"), result.streams):
        assert stream.finished_t is not None and sent.t_ms >= stream.finished_t


async def test_flushed_stream_reports_what_was_played() -> None:
    async def bot(ws: ServerConnection, log: BotLog) -> None:
        await accept(ws, log)
        await play(ws, "1", SECOND)  # stop right after the burst: the flush policy drops the rest
        await log.drain(ws)

    async with bot_server(bot) as (url, log):
        result = await run_call(CallerConfig(url, script=[WaitForBot(3000)], play_finished=True))
    [stream] = result.streams
    [finished] = [a for a in activities(log) if a["name"] == "playFinished"]
    assert stream.flushed_ms > 0
    assert finished["value"] == {"playedDurationMS": round(stream.heard_ms), "status": "finished"}


# -- activities from the bot ---------------------------------------------------------------


async def test_hangup_after_play_finished_cuts_nothing() -> None:
    async def bot(ws: ServerConnection, log: BotLog) -> None:
        await accept(ws, log)
        await play(ws, "bye", SECOND)
        await expect_activity(ws, log, "playFinished")
        await bot_activity(ws, "hangup", hangupReason="caller-done")
        await log.drain(ws)

    async with bot_server(bot) as (url, log):
        cfg = CallerConfig(url, script=[WaitForActivity("hangup", 5000)], stop_policy="drain",
                           play_finished=True)
        result = await run_call(cfg)
    assert result.violations == [] and result.end_reason == "bot-hangup"
    [act] = result.activities_named("hangup")
    assert act.activity["activityParams"] == {"hangupReason": "caller-done"}
    assert (act.ends_call, act.unplayed_ms, act.cut_ms, act.streams_cut, act.open_stream) == (
        True, 0.0, 0.0, [], None)
    assert act.playout_end_ms is not None and act.t_ms >= act.playout_end_ms
    assert result.cut_ms == 0.0 and result.streams[0].heard_ms == 1000.0
    assert log.of_type("session.end")[0]["reasonCode"] == "bot-disconnected"


async def test_hangup_right_after_the_audio_cuts_the_goodbye() -> None:
    async def bot(ws: ServerConnection, log: BotLog) -> None:
        await accept(ws, log)
        await send(ws, {"type": "playStream.start", "streamId": "bye", "mediaFormat": "raw/lpcm16_24"})
        for chunk in SECOND:
            await send(ws, {"type": "playStream.chunk", "streamId": "bye",
                            "audioChunk": b64(chunk)})
        await bot_activity(ws, "hangup")  # before playStream.stop, all of it still queued
        await log.drain(ws)

    async with bot_server(bot) as (url, _):
        result = await run_call(CallerConfig(url, script=[Silence(2000)], stop_policy="drain"))
    [act] = result.bot_activities
    assert act.name == "hangup" and act.ends_call and act.open_stream == "bye"
    assert act.streams_cut == ["bye"] and act.cut_ms == act.unplayed_ms > 0
    assert act.playout_end_ms is not None and act.playout_end_ms > act.t_ms
    [stream] = result.streams
    assert 0 < stream.cut_ms <= act.cut_ms and result.cut_ms == stream.cut_ms
    assert "hangup: unplayed" in format_timeline(result)


async def test_transfer_carried_out_ends_the_call() -> None:
    async def bot(ws: ServerConnection, log: BotLog) -> None:
        await accept(ws, log)
        await bot_activity(ws, "transfer", transferTarget="sip:agent@pbx.invalid", handoverReason="asked")
        await log.drain(ws)

    async with bot_server(bot) as (url, log):
        result = await run_call(CallerConfig(url, script=[Silence(3000)]))
    assert result.violations == [] and result.end_reason == "transfer"
    [act] = result.activities_named("transfer")
    assert act.ends_call and act.cut_ms == 0.0
    [end] = log.of_type("session.end")
    assert end["reasonCode"] == "transferred" and "sip:agent@pbx.invalid" in end["reason"]
    assert result.sent_named("transferStatus") == []


async def test_failed_transfer_sends_transfer_status_and_the_call_goes_on() -> None:
    statuses: list[dict[str, Any]] = []

    async def bot(ws: ServerConnection, log: BotLog) -> None:
        await accept(ws, log)
        await bot_activity(ws, "transfer", transferTarget="tel:+15550123", handoverReason="asked")
        statuses.append(await expect_activity(ws, log, "transferStatus"))
        await play(ws, "sorry", SECOND[:2])
        await bot_activity(ws, "sendDtmf", dtmfDigits="123#")
        await bot_activity(ws, "sendDtmf", dtmfDigits="12a")
        await bot_activity(ws, "transfer", transferTarget="+15550123")  # no tel: scheme
        await log.drain(ws)

    script = [WaitForActivity("transfer", 3000), WaitForBot(3000), WaitForActivity("transfer", 3000)]
    async with bot_server(bot) as (url, log):
        cfg = CallerConfig(url, script=script, stop_policy="drain", transfer_status_delay_ms=0,
                           transfer_result=["failed", "transferred"])
        result = await run_call(cfg)
    assert result.script_timeouts == 0 and result.end_reason == "transfer"
    [status] = statuses
    assert status["type"] == "event" and status["value"] == {
        "status": "failed", "reasonCode": "declined", "reason": "SIP ;cause=603"}
    [sent] = result.sent_named("transferStatus")
    assert sent.value == status["value"]
    first, second = result.activities_named("transfer")
    assert (first.ends_call, second.ends_call) == (False, True)
    assert sent.t_ms >= first.t_ms
    [stream] = result.streams
    assert stream.stream_id == "sorry" and stream.started_t >= first.t_ms
    # the bot transferred again at once: VAIC carried it out with the apology still queued
    assert second.streams_cut == ["sorry"] and second.cut_ms > 0
    assert stream.heard_ms + stream.cut_ms == pytest.approx(200.0)
    assert result.dtmf_received == ["123#", "12a"]
    assert len(result.violations) == 2, result.violations
    assert "sendDtmf dtmfDigits '12a'" in result.violations[0]
    assert "transferTarget '+15550123'" in result.violations[1]
    assert log.of_type("session.end")[0]["reasonCode"] == "transferred"
    assert "sendDtmf from bot: 123#, 12a" in format_timeline(result)


async def test_wait_for_activity_times_out_and_counts_it() -> None:
    async def bot(ws: ServerConnection, log: BotLog) -> None:
        await accept(ws, log)
        await log.drain(ws)

    async with bot_server(bot) as (url, _):
        result = await run_call(CallerConfig(url, script=[WaitForActivity("hangup", 60)]))
    assert result.script_timeouts == 1 and result.end_reason == "caller-hangup"
    assert result.bot_activities == []
