"""Bad input through a real worker: every kind dead-lettered or handled by its documented rule.

One worker on one topic set serves the whole module. Each case and each hypothesis example
uses users of the real log slice under ids of its own (``shift_users``), so cases never share
state, and ``check_mix`` compares states, dead letters and ``/stats/`` counters per case.
"""

from __future__ import annotations

import dataclasses
import json
import socket
import uuid
from collections import Counter

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sec_online import topics
from sec_online.inputfaults import (
    BAD_KINDS,
    Mix,
    MixPlan,
    build_mix,
    check_mix,
    expected_stats_delta,
    mix_runner,
    read_dead_letters,
    shift_users,
    subset,
)
from sec_online.reliability import LogSlice, Record, as_records, build_slice
from sec_online.settings import Settings
from sec_online.statedump import dump_states

USERS = 3
TIMEOUT_S = 120.0


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def base_settings(clustered_settings) -> Settings:
    return clustered_settings("bad-input-work", partitions=2)


@pytest.fixture(scope="module")
def log_slice(base_settings: Settings) -> LogSlice:
    return build_slice(base_settings, USERS)


@pytest.fixture(scope="module")
def runner(kafka_bootstrap, base_settings):
    settings = dataclasses.replace(base_settings, bootstrap_servers=kafka_bootstrap)
    # Module scope rules out the function-scoped topic_prefix and free_ports fixtures.
    prefix = f"t-bad-input-{uuid.uuid4().hex[:8]}-"
    with mix_runner(settings, prefix, _free_port(), TIMEOUT_S) as running:
        yield running


@pytest.fixture(scope="module")
def one_user(log_slice: LogSlice) -> LogSlice:
    # The swapped-returns case needs a user with at least three returns.
    user = next(user for user in log_slice.user_ids if log_slice.expected[user]["returns"] >= 3)
    return subset(log_slice, [user])


@pytest.fixture(scope="module")
def two_users(log_slice: LogSlice) -> LogSlice:
    return subset(log_slice, log_slice.user_ids[:2])


def _late_impression(runner, one_user: LogSlice) -> tuple[Mix, Mix]:
    """The user's events, then an impression with a new event id for the closed first session.

    Returns the mix of all records and the mix of the late impression alone. The late one is
    published only once the worker consumed the rest, because the two topics are consumed
    independently and the impression could otherwise arrive before the return closing it.
    """
    shifted = shift_users(one_user, runner.next_offset())
    records = as_records(runner.settings, shifted.events)
    impressions_topic = runner.settings.topic(topics.IMPRESSIONS)
    first = json.loads(next(r.value for r in records if r.topic == impressions_topic))
    late = {**first, "event_id": f"late:{first['user_id']}"}
    value = json.dumps(late, separators=(",", ":")).encode()
    late_record = Record(impressions_topic, records[0].key, value)
    keys = {r.key for r in records}
    whole = Mix(shifted, [*records, late_record], bad=[], copies=1, keys=keys)
    return whole, Mix(shifted, [late_record], bad=[], copies=1, keys=keys)


def _returns_swapped(runner, one_user: LogSlice) -> Mix:
    """The user's second and third returns published in the wrong order."""
    shifted = shift_users(one_user, runner.next_offset())
    records = as_records(runner.settings, shifted.events)
    returns_topic = runner.settings.topic(topics.RETURNS)
    second, third = [i for i, r in enumerate(records) if r.topic == returns_topic][1:3]
    records[second], records[third] = records[third], records[second]
    # The worker counts the late return as a duplicate, which is the documented rule.
    return Mix(shifted, records, bad=[], copies=1, keys={r.key for r in records})


@pytest.fixture(scope="module")
def cases(runner, one_user: LogSlice) -> dict[str, tuple[Mix, dict]]:
    """Every case on users of its own, consumed together, with each case's outcome."""
    mixes: dict[str, Mix] = {}
    for kind in BAD_KINDS:
        shifted = shift_users(one_user, runner.next_offset())
        mixes[kind] = build_mix(runner.settings, shifted, MixPlan(bad=((kind, 0.5),)), kind)
    copies = MixPlan(copies=((0.1, 0), (0.5, 3), (0.9, 30)))
    shifted = shift_users(one_user, runner.next_offset())
    mixes["exact_duplicates"] = build_mix(runner.settings, shifted, copies, "copies")
    mixes["returns_swapped"] = _returns_swapped(runner, one_user)
    late, late_record = _late_impression(runner, one_user)
    first_phase = [*mixes.values(), dataclasses.replace(late, records=late.records[:-1])]
    delta = runner.consume(first_phase)
    delta += runner.consume([late_record])
    mixes["late_impression"] = late
    states = dump_states(runner.settings)
    letters = read_dead_letters(runner.settings)
    outcomes = {
        name: (mix, check_mix(runner.settings, mix, states=states, letters=letters))
        for name, mix in mixes.items()
    }
    outcomes["_stats"] = (None, {"delta": delta, "expected": expected_stats_delta(mixes.values())})
    outcomes["_states"] = (None, {"states": states})
    return outcomes


@pytest.mark.parametrize("kind", sorted(BAD_KINDS))
def test_bad_kind_dead_lettered(cases, kind):
    mix, outcome = cases[kind]
    details = outcome["details"]
    assert details["bad_records_not_dead_lettered"] == []
    assert details["dead_letters_not_sent"] == []
    assert details["dead_letter_reasons"] == {BAD_KINDS[kind].reason: 1}
    assert outcome["dead_lettered"] == 1
    # Every valid event after the invalid one was applied as well.
    assert outcome["lost"] == 0
    assert outcome["applied_twice"] == 0
    assert details["mismatching_users"] == {}
    assert details["failures"] == []


def test_huge_record_bytes_kept(runner, cases):
    mix, _ = cases["huge_record"]
    sent = mix.bad[0].record.value
    letters = [letter for letter in read_dead_letters(runner.settings) if letter.key in mix.keys]
    assert len(sent) > 1_000_000
    assert len(letters) == 1
    assert letters[0].value == sent
    assert not letters[0].truncated


def test_exact_duplicates_counted(cases):
    _, outcome = cases["exact_duplicates"]
    details = outcome["details"]
    assert details["duplicates_published"] == 3
    assert details["duplicates_detected"] == 3
    assert outcome["dead_lettered"] == 0
    assert details["failures"] == []


def test_late_impression_counted_duplicate(cases):
    _, outcome = cases["late_impression"]
    details = outcome["details"]
    assert details["duplicates_detected"] == 1
    assert outcome["dead_lettered"] == 0
    assert outcome["lost"] == 0
    assert outcome["applied_twice"] == 0
    assert details["failures"] == []


def test_swapped_returns_rule(cases):
    mix, outcome = cases["returns_swapped"]
    (want,) = mix.log_slice.expected.values()
    # The earlier return arrives after a later one and is counted as a duplicate, as the state
    # module documents. The session it would close stays open, and the worker goes on.
    assert outcome["dead_lettered"] == 0
    assert outcome["details"]["duplicates_detected"] == 1
    assert outcome["lost"] == 1
    assert outcome["applied"] == want["impressions"] + want["returns"] - 1


def test_stats_count_every_case(cases):
    _, stats = cases["_stats"]
    assert stats["delta"] == stats["expected"]
    assert stats["expected"]["duplicates"] == 3 + 1 + 1
    reasons = Counter(kind.reason for kind in BAD_KINDS.values())
    for reason, count in reasons.items():
        assert stats["delta"][f"dead:{reason}"] == count


@st.composite
def plans(draw) -> MixPlan:
    positions = st.floats(0.0, 0.999)
    bad = draw(
        st.lists(st.tuples(st.sampled_from(sorted(BAD_KINDS)), positions), min_size=1, max_size=8)
    )
    copies = draw(st.lists(st.tuples(positions, st.integers(0, 40)), max_size=8))
    return MixPlan(bad=tuple(bad), copies=tuple(copies))


@settings(
    max_examples=8,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(plan=plans())
def test_random_mix_matches_reference(runner, two_users, plan):
    outcome = runner.run(two_users, plan)
    details = outcome["details"]
    assert details["failures"] == []
    assert outcome["lost"] == 0
    assert outcome["applied_twice"] == 0
    assert outcome["dead_lettered"] == len(plan.bad)
    assert details["duplicates_detected"] == len(plan.copies)
    assert outcome["published"] == details["valid_events"] + len(plan.bad) + len(plan.copies)


def test_wrong_key_creates_no_user(cases):
    mix, _ = cases["wrong_key"]
    wrong_key = mix.bad[0].record.key
    dumped = {str(state["user_id"]).encode() for state in cases["_states"][1]["states"]}
    assert int(wrong_key) not in mix.log_slice.expected
    assert wrong_key not in dumped
    assert {str(user).encode() for user in mix.log_slice.expected} <= dumped
