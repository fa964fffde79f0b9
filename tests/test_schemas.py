"""Event schemas: round trips, and that any input either decodes or raises InvalidRecord."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sec_online.schemas import (
    MAX_EVENT_ID_CHARS,
    MAX_RECORD_BYTES,
    MAX_TIME_MS,
    MIN_TIME_MS,
    Impression,
    InvalidRecord,
    Return,
    decode_event,
    decode_impression,
    decode_return,
    encode,
)

times = st.integers(MIN_TIME_MS, MAX_TIME_MS - 10_000)
ids = st.integers(0, 2**63 - 1)
flags = st.integers(0, 1)


@st.composite
def impressions(draw):
    session = draw(times)
    return Impression(
        event_id=draw(st.text(min_size=1, max_size=40)),
        user_id=draw(ids),
        video_id=draw(ids),
        time_ms=session + draw(st.integers(0, 10_000)),
        session_id=session,
        click=draw(flags),
        long_view=draw(flags),
        like=draw(flags),
        comment=draw(flags),
        forward=draw(flags),
        follow=draw(flags),
        hate=draw(flags),
        play_time_ms=draw(st.integers(0, 10**9)),
        duration_ms=draw(st.integers(0, 10**9)),
        tab=draw(st.integers(0, 20)),
    )


@st.composite
def returns(draw):
    session = draw(st.integers(MIN_TIME_MS + 1, MAX_TIME_MS))
    previous = draw(st.none() | st.integers(MIN_TIME_MS, session - 1))
    return Return(
        event_id=draw(st.text(min_size=1, max_size=40)),
        user_id=draw(ids),
        time_ms=session,
        session_id=session,
        previous_session_id=previous,
        previous_session_impressions=0 if previous is None else draw(st.integers(1, 500)),
        gap_ms=None if previous is None else draw(st.integers(0, session - previous)),
    )


@given(impressions())
def test_impression_round_trip(record):
    assert decode_impression(encode(record)) == record
    assert decode_event(encode(record)) == record


@given(returns())
def test_return_round_trip(record):
    assert decode_return(encode(record)) == record


@given(st.binary(max_size=2_000))
def test_any_bytes_decode_or_reject(raw):
    try:
        decode_event(raw)
    except InvalidRecord as error:
        assert error.reason in {
            "undecodable",
            "not_object",
            "unknown_schema",
            "missing_field",
            "unexpected_field",
            "wrong_type",
            "out_of_range",
            "too_large",
        }


@given(impressions(), st.sampled_from(["user_id", "time_ms", "click", "event_id"]), st.data())
def test_mutated_field_rejected(record, name, data):
    payload = json.loads(encode(record))
    payload[name] = data.draw(st.sampled_from([None, "7", 1.5, True, [], {}, -1]))
    raw = json.dumps(payload).encode()
    if name == "event_id" and isinstance(payload[name], str):
        assert decode_impression(raw).event_id == "7"
        return
    with pytest.raises(InvalidRecord):
        decode_impression(raw)


def test_nested_json_rejected():
    with pytest.raises(InvalidRecord, match="nested too deeply"):
        decode_event(b"[" * 100_000 + b"]" * 100_000)


def test_too_large_rejected():
    with pytest.raises(InvalidRecord) as error:
        decode_event(b" " * (MAX_RECORD_BYTES + 1))
    assert error.value.reason == "too_large"


def test_huge_integer_rejected():
    record = json.loads(encode(Impression("e", 1, 2, MIN_TIME_MS, MIN_TIME_MS, *[0] * 7, 1, 1, 1)))
    record["video_id"] = 10**30
    with pytest.raises(InvalidRecord, match="64-bit"):
        decode_impression(json.dumps(record).encode())


def test_far_future_time_rejected():
    record = json.loads(encode(Impression("e", 1, 2, MIN_TIME_MS, MIN_TIME_MS, *[0] * 7, 1, 1, 1)))
    record["time_ms"] = MAX_TIME_MS + 1
    with pytest.raises(InvalidRecord, match="outside the valid range"):
        decode_impression(json.dumps(record).encode())


def test_long_event_id_rejected():
    record = json.loads(encode(Impression("e", 1, 2, MIN_TIME_MS, MIN_TIME_MS, *[0] * 7, 1, 1, 1)))
    record["event_id"] = "x" * (MAX_EVENT_ID_CHARS + 1)
    with pytest.raises(InvalidRecord) as error:
        decode_impression(json.dumps(record).encode())
    assert error.value.reason == "too_large"


def test_gap_before_previous_session_rejected():
    start = MIN_TIME_MS + 10 * 86_400_000
    previous = start - 86_400_000
    valid = Return("r", 1, start, start, previous, 3, start - previous)
    assert decode_return(encode(valid)) == valid
    record = json.loads(encode(valid))
    record["gap_ms"] = start - previous + 1
    with pytest.raises(InvalidRecord, match="before its start") as error:
        decode_return(json.dumps(record).encode())
    assert error.value.reason == "out_of_range"


def test_lone_surrogate_event_id_rejected():
    record = json.loads(encode(Impression("e", 1, 2, MIN_TIME_MS, MIN_TIME_MS, *[0] * 7, 1, 1, 1)))
    raw = json.dumps(record).replace('"event_id": "e"', '"event_id": "x\\ud800y"').encode()
    with pytest.raises(InvalidRecord, match="not valid Unicode text") as caught:
        decode_impression(raw)
    assert caught.value.reason == "undecodable"


def test_empty_value_named_in_message():
    with pytest.raises(InvalidRecord, match="record value is empty") as caught:
        decode_impression(b"")
    assert caught.value.reason == "undecodable"


def test_wrong_type_spelled_as_json():
    record = json.loads(encode(Impression("e", 1, 2, MIN_TIME_MS, MIN_TIME_MS, *[0] * 7, 1, 1, 1)))
    record["click"] = True
    with pytest.raises(InvalidRecord, match="click=true must be an integer"):
        decode_impression(json.dumps(record).encode())
