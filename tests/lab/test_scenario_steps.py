"""Parsing of the laptop step kinds (``do = ...``) and of paths absent at start; pure, no root.

Every rejection must be a ScenarioError naming the file, the step (its number in the file)
and the key, so a scenario author can find the line.
"""

from __future__ import annotations

from typing import Any

import attrs
import pytest

from jvpn_trio.lab.netns import LabPath, LabSpec
from jvpn_trio.lab.runner import lab_spec_for, traffic_back
from jvpn_trio.lab.scenario import (
    ADD_ADDRESS,
    ADD_INTERFACE,
    DELETE_INTERFACE,
    GATEWAY_TARGET,
    KILL_GATEWAY,
    LAPTOP_TARGET,
    RESUME,
    START_GATEWAY,
    SUSPEND,
    ScenarioError,
    load_scenario,
    scenario_from_mapping,
    shipped_scenario,
)

LAPTOP = ("hotplug", "dhcp-renew", "gateway-restart", "all-down", "suspend")


def scenario(steps: list[dict[str, Any]], **paths: dict[str, Any]) -> dict[str, Any]:
    table = [
        {"name": "eth0", "kind": "ethernet", "priority": 10, **paths.get("eth0", {})},
        {"name": "wifi0", "kind": "wifi", "priority": 20, **paths.get("wifi0", {})},
    ]
    return {"name": "t", "duration_s": 20.0, "path": table, "step": steps}


def parse(data: dict[str, Any]) -> Any:
    return scenario_from_mapping(data, source="t.toml")


def test_every_step_kind_parses() -> None:
    sc = parse(
        scenario(
            [
                {"at_s": 2.0, "path": "eth0", "do": "add-interface"},
                {"at_s": 4.0, "path": "wifi0", "do": "flush-address"},
                {"at_s": 5.0, "path": "wifi0", "do": "add-address", "host": 3},
                {"at_s": 6.0, "path": "wifi0", "do": "add-address", "subnet": 1},
                {"at_s": 7.0, "do": "kill-gateway"},
                {"at_s": 8.0, "do": "start-gateway", "note": "back"},
                {"at_s": 9.0, "path": "eth0", "do": "delete-interface"},
            ],
            eth0={"present": False},
        )
    )
    assert [p.present for p in sc.paths] == [False, True]
    assert [(s.kind, s.path) for s in sc.steps] == [
        (ADD_INTERFACE, "eth0"), ("flush-address", "wifi0"), (ADD_ADDRESS, "wifi0"), (ADD_ADDRESS, "wifi0"),
        (KILL_GATEWAY, GATEWAY_TARGET), (START_GATEWAY, GATEWAY_TARGET), (DELETE_INTERFACE, "eth0"),
    ]  # fmt: skip
    assert (sc.steps[2].subnet, sc.steps[2].host) == (0, 3) and (sc.steps[3].subnet, sc.steps[3].host) == (1, 2)
    assert sc.steps[5].describe() == "gateway: start-gateway (back)"
    assert sc.conditions_at(20.0)["eth0"] == sc.paths[0].baseline  # do steps change no impairment
    spec = lab_spec_for(sc, prefix="jvlabtest")
    assert spec.absent == frozenset({"eth0"})


@pytest.mark.parametrize(
    ("step", "paths", "message"),
    [
        ({"at_s": 1.0, "path": "eth0", "do": "unplug"}, {}, "#1.do: expected one of"),
        ({"at_s": 1.0, "path": "eth0", "do": "add-interface", "set": {"link": "up"}}, {}, "#1: give 'set' or 'do'"),
        ({"at_s": 1.0, "path": "eth0", "do": "delete-interface", "subnet": 1}, {}, "#1: unknown key(s) for this step: subnet"),
        ({"at_s": 1.0, "path": "eth0", "do": "kill-gateway"}, {}, "#1: unknown key(s) for this step: path"),
        ({"at_s": 1.0, "do": "flush-address"}, {}, "#1.path: None is not a path"),
        ({"at_s": 1.0, "path": "*", "do": "delete-interface"}, {}, "#1.path: '*' is not a path"),
        ({"at_s": 1.0, "path": "wifi0", "do": "add-address", "subnet": 4}, {}, "#1.subnet: expected an integer 0..3"),
        ({"at_s": 1.0, "path": "wifi0", "do": "add-address", "host": 1}, {}, "#1.host: expected an integer 2..254"),
        ({"at_s": 1.0, "path": "wifi0", "do": "add-address", "host": True}, {}, "#1.host"),
        ({"at_s": 0.0, "path": "eth0", "do": "delete-interface"}, {}, "#1.at_s: a 'delete-interface' step must come after"),
        ({"at_s": 1.0, "path": "eth0", "do": "add-interface"}, {}, "#1 (at 1 s, add-interface): eth0 exists then"),
        ({"at_s": 1.0, "path": "eth0", "do": "delete-interface"}, {"eth0": {"present": False}}, "#1 (at 1 s, delete-interface): eth0 has no interface"),
        ({"at_s": 1.0, "path": "eth0", "set": {"loss_pct": 5.0}}, {"eth0": {"present": False}}, "#1 (at 1 s, loss_pct=5.0): eth0 has no interface"),
        ({"at_s": 1.0, "do": "start-gateway"}, {}, "#1 (at 1 s, start-gateway): the gateway is running then"),
        ({"at_s": 1.0, "path": "eth0", "do": "add-interface"}, {"eth0": {"present": False, "delay_ms": 2.0}}, "eth0: a path whose interface comes or goes"),
        ({"at_s": 1.0, "path": "eth0", "do": "add-interface"}, {"eth0": {"present": "no"}}, "[[path]] #1.present: expected true or false"),
        ({"at_s": 1.0, "do": "resume"}, {}, "#1 (at 1 s, resume): the laptop is not asleep then"),
        ({"at_s": 1.0, "do": "suspend"}, {}, "the laptop is still asleep at the end (add a 'resume' step)"),
        ({"at_s": 1.0, "path": "eth0", "do": "suspend"}, {}, "#1: unknown key(s) for this step: path"),
        ({"at_s": 1.0, "do": "suspend", "slept_s": 5.0}, {}, "#1: unknown key(s) for this step: slept_s"),
        ({"at_s": 1.0, "do": "resume", "slept_s": 0.0}, {}, "#1.slept_s: expected more than 0 and at most 86400 s"),
        ({"at_s": 1.0, "do": "resume", "slept_s": 90_000.0}, {}, "#1.slept_s: expected more than 0"),
        ({"at_s": 1.0, "do": "thaw-gateway"}, {}, "#1 (at 1 s, thaw-gateway): the gateway is not frozen then"),
        ({"at_s": 1.0, "do": "freeze-gateway"}, {}, "the gateway is still frozen at the end (add a 'thaw-gateway' step)"),
        ({"at_s": 1.0, "path": "eth0", "do": "freeze-gateway"}, {}, "#1: unknown key(s) for this step: path"),
    ],
)
def test_impossible_or_malformed_steps_are_named(step: dict[str, Any], paths: dict[str, Any], message: str) -> None:
    with pytest.raises(ScenarioError) as caught:
        parse(scenario([step], **paths))
    text = str(caught.value)
    assert text.startswith("t.toml: ") and message in text, text


def test_the_timeline_is_played_in_time_order_and_names_the_step_in_the_file() -> None:
    steps = [
        {"at_s": 5.0, "path": "wifi0", "do": "flush-address"},  # #1
        {"at_s": 3.0, "path": "wifi0", "do": "flush-address"},  # #2 comes first: #1 then has nothing to flush
    ]
    with pytest.raises(ScenarioError, match=r"\[\[step\]\] #1 \(at 5 s, flush-address\): wifi0 has no address"):
        parse(scenario(steps))
    twice = [{"at_s": 2.0, "do": "kill-gateway"}, {"at_s": 3.0, "do": "kill-gateway"}]
    with pytest.raises(ScenarioError, match=r"#2 .*the gateway is not running then"):
        parse(scenario(twice))


def test_a_gateway_freeze_is_a_pair_of_gateway_steps_and_nothing_else_happens_to_it_meanwhile() -> None:
    sc = parse(scenario([{"at_s": 2.0, "do": "freeze-gateway"}, {"at_s": 2.2, "do": "thaw-gateway"}]))
    assert [(s.kind, s.path) for s in sc.steps] == [("freeze-gateway", GATEWAY_TARGET), ("thaw-gateway", GATEWAY_TARGET)]
    for steps, message in (
        ([{"at_s": 2.0, "do": "freeze-gateway"}, {"at_s": 3.0, "do": "freeze-gateway"}], "#2 .*the gateway is frozen then"),
        ([{"at_s": 2.0, "do": "freeze-gateway"}, {"at_s": 3.0, "do": "kill-gateway"}], "#2 .*frozen then \\(thaw it first\\)"),
        ([{"at_s": 2.0, "do": "kill-gateway"}, {"at_s": 3.0, "do": "freeze-gateway"}], "#2 .*the gateway is not running then"),
    ):
        with pytest.raises(ScenarioError, match=message):
            parse(scenario(steps))


def test_a_suspend_is_a_pair_of_laptop_steps_and_the_short_form_keeps_the_sleep() -> None:
    steps = [
        {"at_s": 2.0, "do": "suspend"},
        {"at_s": 3.0, "path": "wifi0", "set": {"link": "down"}},  # the network changes while asleep
        {"at_s": 4.0, "path": "wifi0", "do": "flush-address"},
        {"at_s": 8.0, "do": "resume", "slept_s": 1_800.0, "note": "half an hour"},
        {"at_s": 10.0, "do": "suspend"},
        {"at_s": 12.0, "do": "resume"},  # slept as long as it was stopped
    ]
    sc = parse(scenario(steps))
    assert [(s.kind, s.path, s.slept_s) for s in sc.steps if s.kind in (SUSPEND, RESUME)] == [
        (SUSPEND, LAPTOP_TARGET, None), (RESUME, LAPTOP_TARGET, 1_800.0), (SUSPEND, LAPTOP_TARGET, None), (RESUME, LAPTOP_TARGET, None),
    ]  # fmt: skip
    assert sc.steps[3].describe() == "laptop: resume slept_s=1800 (half an hour)"
    short = attrs.evolve(sc, short_duration_s=10.0).short()
    assert [s.at_s for s in short.steps][:4] == [1.0, 1.5, 2.0, 4.0] and short.steps[3].slept_s == 1_800.0


@pytest.mark.parametrize(
    ("steps", "message"),
    [
        ([{"at_s": 2.0, "do": "suspend"}, {"at_s": 3.0, "do": "suspend"}, {"at_s": 4.0, "do": "resume"}],
         r"#2 \(at 3 s, suspend\): the laptop is asleep then"),
        ([{"at_s": 2.0, "do": "suspend"}, {"at_s": 5.0, "do": "resume", "slept_s": 2.0}],
         r"#2 \(at 5 s, resume slept_s=2\)\.slept_s: 2 s is shorter than the 3 s since the suspend"),
        ([{"at_s": 2.0, "do": "suspend"}, {"at_s": 3.0, "do": "kill-gateway"}, {"at_s": 4.0, "do": "resume"}],
         r"#2 .*gateway steps are not simulated during a suspend"),
    ],
)  # fmt: skip
def test_an_impossible_sleep_is_named(steps: list[dict[str, Any]], message: str) -> None:
    with pytest.raises(ScenarioError, match=message):
        parse(scenario(steps))


def test_an_address_may_be_added_over_one_and_an_interface_may_come_back() -> None:
    parse(
        scenario(
            [
                {"at_s": 1.0, "path": "wifi0", "do": "add-address", "subnet": 2},
                {"at_s": 2.0, "path": "wifi0", "do": "delete-interface"},
                {"at_s": 3.0, "path": "wifi0", "do": "add-interface"},
                {"at_s": 4.0, "path": "*", "set": {"link": "down"}},
            ]
        )
    )


@pytest.mark.parametrize("name", LAPTOP)
def test_the_laptop_scenarios_parse_with_a_short_form(name: str) -> None:
    sc = load_scenario(shipped_scenario(name))
    short = sc.short()
    assert sc.description and 10.0 <= short.duration_s <= 20.0
    assert [s.at_s for s in short.steps] == sorted(s.at_s for s in short.steps)
    assert all(s.at_s > 0 for s in short.steps)
    lab_spec_for(short, prefix="jvlabtest")


def test_all_down_outlasts_the_transport_loss_ttl_in_both_forms() -> None:
    for sc in (load_scenario(shipped_scenario("all-down")), load_scenario(shipped_scenario("all-down")).short()):
        down, back = sc.steps
        assert down.path == "*" and dict(down.changes) == {"link": "down"}
        assert (back.at_s - down.at_s) * 1000 > sc.policy.transport_loss_ttl_ms


def test_hotplug_starts_without_its_preferred_interface() -> None:
    sc = load_scenario(shipped_scenario("hotplug"))
    usb = sc.path("usb0")
    assert not usb.present and usb.priority < sc.path("wifi0").priority
    assert [s.kind for s in sc.steps] == [ADD_INTERFACE, DELETE_INTERFACE]


def test_subnets_of_a_path_follow_the_address_plan() -> None:
    spec = LabSpec(prefix="jvlabtest", paths=(LabPath(name="wifi0", kind="wifi", metric=20, index=2),))
    path = spec.paths[0]
    assert spec.link_addresses(path) == ("10.77.2.2", "10.77.2.1")
    assert spec.link_addresses(path, subnet=1, host=3) == ("10.77.66.3", "10.77.66.1")
    with pytest.raises(ValueError):
        spec.link_addresses(path, subnet=4)
    with pytest.raises(ValueError):
        spec.link_addresses(path, host=1)
    with pytest.raises(ValueError):
        LabSpec(prefix="jvlabtest", paths=(path,), absent={"eth0"})


def test_traffic_back_is_the_end_of_the_first_interruption() -> None:
    stream = [i / 100 for i in range(100)] + [1.5 + i / 100 for i in range(50)]  # stops at 0.99, back at 1.5
    assert traffic_back(stream, 0.5, 2.0) == pytest.approx(1.0)
    assert traffic_back(stream, 1.2, 2.0) == pytest.approx(0.3)  # already stopped when the window began
    assert traffic_back(stream, 0.0, 0.9) == pytest.approx(0.0)  # never interrupted: its first arrival
    assert traffic_back(stream, 0.5, 1.4) is None  # stopped and not back within the window
    assert traffic_back([], 0.0, 1.0) is None
