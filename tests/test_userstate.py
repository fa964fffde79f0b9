"""User state machine: order independence across topics, duplicates, closes and features."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sec_online.levels import even_boundaries
from sec_online.schemas import Impression, Return
from sec_online.userstate import (
    APPLIED,
    DUPLICATE,
    HISTORY_DECAY,
    MAX_AHEAD_MS,
    StateConflict,
    UserStateMachine,
    action_weight,
    feature_names,
    return_speed,
)

DAY = 86_400_000
T0 = 1_650_812_741_436
CLUSTERS = 4


def machine() -> UserStateMachine:
    return UserStateMachine(CLUSTERS, lambda video: None if video >= 100 else video % CLUSTERS, 0.3)


def impression(session: int, offset: int, video: int, **signals: int) -> Impression:
    values = {name: 0 for name in ("click", "long_view", "like", "comment", "forward", "follow")}
    values["hate"] = 0
    values.update(signals)
    return Impression(
        event_id=f"7:{session + offset}:{video}",
        user_id=7,
        video_id=video,
        time_ms=session + offset,
        session_id=session,
        play_time_ms=5_000,
        duration_ms=10_000,
        tab=1,
        **values,
    )


def return_event(session: int, previous: int | None, count: int, gap: int | None) -> Return:
    return Return(
        event_id=f"return:7:{session}",
        user_id=7,
        time_ms=session,
        session_id=session,
        previous_session_id=previous,
        previous_session_impressions=count,
        gap_ms=gap,
    )


def three_sessions() -> tuple[list[Impression], list[Return]]:
    """Three sessions of user 7 with 3, 2 and 1 impressions; the first gap is unknown."""
    s1, s2, s3 = T0, T0 + DAY, T0 + 3 * DAY
    impressions = [
        impression(s1, 0, 1, click=1, long_view=1),
        impression(s1, 0, 2),
        impression(s1, 60_000, 101, hate=1),
        impression(s2, 0, 3, like=1, long_view=1),
        impression(s2, 30_000, 1, hate=1),
        impression(s3, 0, 2, click=1),
    ]
    returns = [
        return_event(s1, None, 0, None),
        return_event(s2, s1, 3, DAY - 60_000),
        return_event(s3, s2, 2, 2 * DAY - 30_000),
    ]
    return impressions, returns


def run(order: list[Impression | Return]) -> tuple[dict, list]:
    sm = machine()
    state, samples = None, []
    boundaries = even_boundaries(3)
    for event in order:
        if isinstance(event, Impression):
            outcome = sm.apply_impression(state, event)
        else:
            outcome = sm.apply_return(state, event, boundaries, 0)
        state = outcome.state
        samples.extend(outcome.samples)
    return state, samples


@st.composite
def interleavings(draw):
    impressions, returns = three_sessions()
    picks = draw(st.permutations([0] * len(impressions) + [1] * len(returns)))
    queues = [list(impressions), list(returns)]
    return [queues[pick].pop(0) for pick in picks]


def test_in_order_final_state():
    impressions, returns = three_sessions()
    order = [
        returns[0],
        *impressions[:3],
        returns[1],
        *impressions[3:5],
        returns[2],
        impressions[5],
    ]
    state, samples = run(order)
    assert state["impressions"] == 6
    assert state["sessions"] == 3
    assert state["closed_sessions"] == 2
    assert state["returns"] == 3
    assert state["unknown_videos"] == 1
    assert state["signal_totals"] == [2, 2, 1, 0, 0, 0, 2]
    assert len(samples) == 2
    assert list(state["open"]) == [str(T0 + 3 * DAY)]
    speed1, speed2 = return_speed(DAY - 60_000), return_speed(2 * DAY - 30_000)
    assert state["retention_score"] == pytest.approx(0.7 * speed1 + 0.3 * speed2)
    assert state["history"]["impressions"] == pytest.approx(HISTORY_DECAY * 3 + 2)


def test_sample_content():
    impressions, returns = three_sessions()
    order = [
        returns[0],
        *impressions[:3],
        returns[1],
        *impressions[3:5],
        returns[2],
        impressions[5],
    ]
    _, samples = run(order)
    first, second = samples
    assert first.session_id == T0
    assert first.event_id == "return:7:" + str(T0 + DAY)
    # Video 1 (cluster 1): click and long view -> 2; video 2 (cluster 2) -> 1; video 101 unknown.
    assert first.actions == [[1, 2.0], [2, 1.0]]
    assert first.gap_ms == DAY - 60_000
    assert first.features == [0.0] * len(feature_names(CLUSTERS))
    # Session 2 starts after session 1 is folded in: rates over its 3 impressions.
    assert second.features[0] == pytest.approx(1 / 3)
    # Video 3 (cluster 3) has like + long view -> 3; video 1 has a hate -> weight 0, left out.
    assert second.actions == [[3, 3.0]]


@settings(max_examples=200, deadline=None)
@given(interleavings())
def test_any_interleaving_same_result(order):
    impressions, returns = three_sessions()
    expected_state, expected_samples = run(
        [returns[0], *impressions[:3], returns[1], *impressions[3:5], returns[2], impressions[5]]
    )
    state, samples = run(order)
    assert json.dumps(state, sort_keys=True) == json.dumps(expected_state, sort_keys=True)
    assert samples == expected_samples


def test_duplicate_impression_open_session():
    sm = machine()
    event = impression(T0, 0, 1)
    state = sm.apply_impression(None, event).state
    outcome = sm.apply_impression(state, event)
    assert outcome.status == DUPLICATE
    assert outcome.state["impressions"] == 1
    assert outcome.state["duplicates"] == 1


def test_duplicate_after_close():
    impressions, returns = three_sessions()
    state, _ = run([returns[0], *impressions[:3], returns[1]])
    outcome = machine().apply_impression(state, impressions[0])
    assert outcome.status == DUPLICATE
    assert outcome.state["impressions"] == 3


def test_duplicate_return():
    impressions, returns = three_sessions()
    state, samples = run([returns[0], *impressions[:3], returns[1]])
    outcome = machine().apply_return(state, returns[1], even_boundaries(3), 0)
    assert outcome.status == DUPLICATE
    assert outcome.samples == []
    assert outcome.state["returns"] == 2
    assert len(samples) == 1


def test_conflicting_return_rejected():
    impressions, returns = three_sessions()
    state, _ = run([returns[0], *impressions[:3], returns[1], *impressions[3:5], returns[2]])
    bad = return_event(T0 + 4 * DAY, T0 + DAY, 2, 1_000)
    with pytest.raises(StateConflict, match="already closed"):
        machine().apply_return(state, bad, even_boundaries(3), 0)


def test_close_waits_for_count():
    impressions, returns = three_sessions()
    state, samples = run([returns[0], impressions[0], returns[1]])
    assert samples == []
    assert state["closed_sessions"] == 0
    assert len(state["pending"]) == 1
    outcome = machine().apply_impression(state, impressions[1])
    assert outcome.samples == []
    outcome = machine().apply_impression(outcome.state, impressions[2])
    assert len(outcome.samples) == 1
    assert outcome.state["closed_sessions"] == 1


def test_level_from_boundaries():
    impressions, returns = three_sessions()
    sm = machine()
    state = sm.apply_return(None, returns[0], [0.4, 0.6], 5).state
    assert state["level"] is None
    state = sm.apply_return(state, returns[1], [0.4, 0.6], 5).state
    # A gap just under one day gives a speed just over 0.5: the middle level.
    assert state["level"] == 1
    assert state["boundaries_version"] == 5


def test_action_weight_never_negative():
    assert action_weight(impression(T0, 0, 1, hate=1)) == 0
    assert action_weight(impression(T0, 0, 1, long_view=1, like=1, follow=1)) == 4


def test_state_is_json():
    impressions, returns = three_sessions()
    state, _ = run([returns[0], *impressions])
    assert json.loads(json.dumps(state)) == state
    assert APPLIED == "applied"


def test_far_ahead_impression_rejected():
    m = machine()
    state = m.apply_impression(None, impression(T0, 0, 1)).state
    later = T0 + MAX_AHEAD_MS + 1
    with pytest.raises(StateConflict) as error:
        m.apply_impression(state, impression(later, 0, 2))
    assert error.value.reason == "too_far_ahead"
    assert state["impressions"] == 1
    assert list(state["open"]) == [str(T0)]
    assert state["last_event_ms"] == T0


def test_far_ahead_return_rejected_state_unchanged():
    m = machine()
    state = m.apply_return(None, return_event(T0, None, 0, None), even_boundaries(3), 0).state
    before = json.loads(json.dumps(state))
    far = T0 + MAX_AHEAD_MS + DAY
    with pytest.raises(StateConflict, match="too_far_ahead"):
        m.apply_return(state, return_event(far, T0, 0, DAY), even_boundaries(3), 0)
    assert state == before
    # A real later return is still applied, so one corrupt record cannot freeze the user.
    outcome = m.apply_return(state, return_event(T0 + DAY, T0, 0, DAY), even_boundaries(3), 0)
    assert outcome.status == APPLIED
    assert outcome.state["returns"] == 2


def test_bound_admits_a_year_pause():
    m = machine()
    state = m.apply_impression(None, impression(T0, 0, 1)).state
    outcome = m.apply_impression(state, impression(T0 + MAX_AHEAD_MS, 0, 2))
    assert outcome.status == APPLIED
    assert outcome.state["last_event_ms"] == T0 + MAX_AHEAD_MS


def test_first_event_has_no_bound():
    m = machine()
    outcome = m.apply_impression(None, impression(T0 + 10 * MAX_AHEAD_MS, 0, 1))
    assert outcome.status == APPLIED
