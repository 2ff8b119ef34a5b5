"""The agent's controller list, sans-IO: parsing ``--controller``, the shuffled order, passes
without waiting between controllers, back-off only after a whole pass failed, DNS names expanded
per pass, and how a fleet spreads when a controller dies."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from agent.backoff import Backoff
from agent.controller_list import (
    ControllerEntry,
    ControllerOrder,
    Dial,
    Resolve,
    Target,
    Wait,
    order_rng,
    parse_controllers,
)
from margo_stream.errors import ConfigError

A, B, C = "10.0.0.1:4433", "10.0.0.2:4433", "10.0.0.3:4433"


def make(text: str, seed: int = 1, *, base: float = 0.5, cap: float = 30.0) -> ControllerOrder:
    backoff = Backoff(base=base, cap=cap, rng=random.Random(seed))
    return ControllerOrder(parse_controllers(text), random.Random(seed), backoff)


def dial(order: ControllerOrder) -> Target:
    action = order.next_action()
    assert isinstance(action, Dial), action
    return action.target


def wait(order: ControllerOrder) -> float:
    action = order.next_action()
    assert isinstance(action, Wait), action
    return action.delay


def fail_all(order: ControllerOrder) -> list[str]:
    """Dial until the pass ends in a wait, failing each: the endpoints, in order."""
    seen = []
    while isinstance(action := order.next_action(), Dial):
        seen.append(action.target.endpoint)
        order.failed(action.target)
    assert isinstance(action, Wait)
    return seen


# --- parsing ----------------------------------------------------------------------------------
def test_the_single_address_form_is_one_entry() -> None:
    assert parse_controllers("127.0.0.1:4433") == (ControllerEntry("127.0.0.1", 4433),)
    [v6] = parse_controllers("[::1]:4433")
    assert v6 == ControllerEntry("::1", 4433) and str(v6) == "[::1]:4433" and v6.literal


def test_a_list_keeps_its_entries_and_normalises_names() -> None:
    entries = parse_controllers("127.0.0.1:1, Ctl.Example.COM.:2,[::1]:3")
    assert [str(e) for e in entries] == ["127.0.0.1:1", "ctl.example.com:2", "[::1]:3"]
    assert [e.literal for e in entries] == [True, False, True]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("127.0.0.1:1,,127.0.0.1:2", "--controller '127.0.0.1:1,,127.0.0.1:2': entry 2 is empty"),
        ("127.0.0.1:1,", "entry 2 is empty"),
        (" ", "entry 1 is empty"),
        ("127.0.0.1:1,ctl", "--controller entry 'ctl' is not HOST:PORT"),
        ("127.0.0.1:1,ctl:x", "'ctl:x' is not HOST:PORT"),
        ("ctl:0", "'ctl:0': port 0 is out of range"),
        ("ctl:1,ctl:70000", "'ctl:70000': port 70000 is out of range"),
        ("ctl:1,CTL:1", "entry 2 'CTL:1' repeats entry 1"),
        ("127.0.0.1:1,10.0.0.1:1,127.0.0.1:1", "entry 3 '127.0.0.1:1' repeats entry 1"),
        ("[::1]:1,[0:0::1]:1", "entry 2 '[0:0::1]:1' repeats entry 1"),
        ("bad host:1", "'bad host:1': 'bad host' is not an IP address or host name"),
    ],
)
def test_a_bad_list_is_refused_naming_the_entry(text: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_controllers(text)
    assert message in str(info.value) and "\n" not in str(info.value)


# --- the order ----------------------------------------------------------------------------------
def test_the_order_is_shuffled_per_agent_and_fixed_by_a_seed() -> None:
    entries = parse_controllers(f"{A},{B},{C}")
    firsts = Counter(
        ControllerOrder(entries, order_rng(f"dev-{n}", "seed"), Backoff()).entries[0]
        for n in range(300)
    )
    assert set(firsts) == set(entries) and min(firsts.values()) > 60  # about 100 each
    one = ControllerOrder(entries, order_rng("dev-1", "seed"), Backoff())
    assert one.entries == ControllerOrder(entries, order_rng("dev-1", "seed"), Backoff()).entries
    # with no seed the same device draws fresh randomness at every start
    draws = {order_rng("dev-1").getrandbits(64) for _ in range(5)}
    assert len(draws) == 5


def test_a_pass_dials_every_controller_without_waiting_then_backs_off() -> None:
    order = make(f"{A},{B},{C}")
    first = fail_all(order)
    assert sorted(first) == [A, B, C]
    # the next pass: same order, after a back-off drawn from the existing policy
    assert fail_all(order) == first
    assert order.passes == 2 and order.backoff.attempt == 2


def test_backoff_grows_over_failed_passes_and_a_session_resets_it() -> None:
    order = make(f"{A},{B}", base=1.0, cap=4.0)
    ceilings = []
    for _ in range(5):
        while isinstance(action := order.next_action(), Dial):
            order.failed(action.target)
        assert isinstance(action, Wait)
        ceilings.append(min(4.0, 2 ** (order.backoff.attempt - 1)))
        assert 0 <= action.delay <= ceilings[-1]
    assert ceilings == [1, 2, 4, 4, 4]
    target = dial(order)
    order.ready(target)
    assert order.backoff.attempt == 0


def test_a_lost_connection_goes_to_the_next_controller_at_once() -> None:
    order = make(f"{A},{B},{C}")
    first = dial(order)
    order.ready(first)
    order.lost(first, uptime=3600.0)
    # the rest of the order at once, the lost one left out; then a back-off
    after = fail_all(order)
    expected = [e.endpoint for e in order.targets({})]
    i = expected.index(first.endpoint)
    assert after == expected[i + 1 :] + expected[:i]
    # the pass after the back-off starts where the last one stopped and includes it again
    assert fail_all(order) == [first.endpoint, *after]


def test_a_loss_late_in_a_pass_still_gets_a_whole_fresh_pass() -> None:
    order = make(f"{A},{B},{C}")
    one, two, three = (t.endpoint for t in order.targets({}))
    order.failed(dial(order))
    second = dial(order)
    order.ready(second)
    order.lost(second, uptime=3600.0)
    # not just the rest of the old pass (three): the next one on, then round to the first
    assert fail_all(order) == [three, one]


def test_one_controller_backs_off_after_a_loss_as_before() -> None:
    order = make("127.0.0.1:4433")
    target = dial(order)
    order.ready(target)
    order.lost(target, uptime=3600.0)
    assert isinstance(order.next_action(), Wait)  # never an immediate redial of the one we lost
    assert dial(order) == target
    order.failed(target)
    assert isinstance(order.next_action(), Wait)


def test_a_short_lived_connection_earns_no_fresh_pass() -> None:
    """A controller that accepts and drops at once (or two agents of one identity replacing
    each other) cannot make the agent hop without pause: the pass it came from goes on."""
    order = make(f"{A},{B}")
    first = dial(order)
    order.ready(first)
    order.lost(first, uptime=0.5)
    second = dial(order)  # the rest of the same pass, at once
    assert second.endpoint != first.endpoint
    order.ready(second)
    order.lost(second, uptime=0.5)
    assert isinstance(order.next_action(), Wait)


def test_the_agents_own_reconnect_returns_to_the_same_controller() -> None:
    order = make(f"{A},{B},{C}")
    first = dial(order)
    order.ready(first)
    order.lost(first, uptime=1.0, retry_same=True)
    assert dial(order) == first


def test_outcomes_out_of_turn_are_refused() -> None:
    order = make(A)
    target = Target(ControllerEntry("10.0.0.1", 4433), "10.0.0.1", (0, b""))
    with pytest.raises(RuntimeError):
        order.failed(target)
    dial(order)
    with pytest.raises(RuntimeError):
        order.lost(target, 1.0)
    with pytest.raises(RuntimeError):
        order.next_action()


# --- DNS names ----------------------------------------------------------------------------------
def test_a_name_expands_into_its_addresses_resolved_at_every_pass() -> None:
    order = make("ctl.example:4433")
    [entry] = order.entries
    action = order.next_action()
    assert action == Resolve((entry,))
    order.resolved({entry: ["10.0.0.1", "10.0.0.2", "10.0.0.1", "fd00::1"]})
    tried = []
    while isinstance(action := order.next_action(), Dial):
        assert action.target.entry == entry  # the name given: its TLS check is unchanged
        assert str(action.target) == f"ctl.example:4433 ({action.target.address})"
        tried.append(action.target.endpoint)
        order.failed(action.target)
    assert sorted(tried) == ["10.0.0.1:4433", "10.0.0.2:4433", "[fd00::1]:4433"]
    assert isinstance(order.next_action(), Resolve)  # again for the next pass


def test_addresses_of_a_name_are_ranked_per_agent_and_stay_ranked_when_the_set_changes() -> None:
    entry = ControllerEntry("ctl.example", 4433)
    addresses = [f"10.0.0.{n}" for n in range(1, 9)]
    firsts = set()
    for seed in range(40):
        order = ControllerOrder((entry,), random.Random(seed), Backoff())
        full = [t.address for t in order.targets({entry: addresses})]
        firsts.add(full[0])
        fewer = [t.address for t in order.targets({entry: list(reversed(addresses[1:]))})]
        assert fewer == [a for a in full if a != addresses[0]]
    assert len(firsts) >= 5  # agents do not all start on the first record


def test_a_name_that_does_not_resolve_leaves_the_pass_to_the_others() -> None:
    order = make(f"ctl.example:4433,{A}")
    assert isinstance(order.next_action(), Resolve)
    order.resolved({})  # the resolver logged the failure
    assert fail_all(order) == [A]
    # a name that never resolves and nothing else: a pass of nothing, then a back-off
    only = make("ctl.example:4433")
    assert isinstance(only.next_action(), Resolve)
    only.resolved({})
    assert isinstance(only.next_action(), Wait)


def test_an_address_reached_twice_is_dialled_once() -> None:
    order = make(f"ctl.example:4433,{A}")
    name = next(e for e in order.entries if not e.literal)
    order.next_action()
    order.resolved({name: ["10.0.0.1", "10.0.0.9"]})
    assert sorted(fail_all(order)) == [A, "10.0.0.9:4433"]


def test_a_lost_address_that_left_the_name_still_moves_the_order_on() -> None:
    order = make("ctl.example:4433")
    [entry] = order.entries
    order.next_action()
    addresses = ["10.0.0.1", "10.0.0.2", "10.0.0.3"]
    order.resolved({entry: addresses})
    first = dial(order)
    order.ready(first)
    order.lost(first, uptime=3600.0)
    assert isinstance(order.next_action(), Resolve)
    ranked = [t.address for t in order.targets({entry: addresses})]
    order.resolved({entry: [a for a in addresses if a != first.address]})
    nxt = ranked[(ranked.index(first.address) + 1) % 3]
    assert dial(order).address == nxt


# --- a fleet ------------------------------------------------------------------------------------
def test_a_dead_controllers_devices_spread_over_the_survivors() -> None:
    entries = parse_controllers(f"{A},{B},{C}")
    on_a = 0
    moved_to: Counter[str] = Counter()
    for n in range(600):
        order = ControllerOrder(entries, order_rng(f"dev-{n}", "fleet"), Backoff())
        first = dial(order)
        if first.endpoint != A:
            continue
        on_a += 1
        order.ready(first)
        order.lost(first, uptime=600.0)
        moved_to[dial(order).endpoint] += 1
    assert 150 < on_a < 250  # a third of 600
    assert set(moved_to) == {B, C} and min(moved_to.values()) > on_a / 3
