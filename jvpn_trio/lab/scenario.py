"""Scripted fault timelines (``scenarios/*.toml``, shipped with the package), shared by the demo and the lab.

A scenario names its paths (with a baseline impairment each) and a list of
steps: at time ``at_s`` set some impairment of one path (or of every path
with ``path = "*"``).  The demo carries the steps out with userspace relays;
the lab with links, nft and tc in network namespaces.  Parsing is pure and
strict: every problem is a :class:`ScenarioError` naming the file, the step
and the key.  Each scenario has a short form for CI: the same steps, with
every time scaled by ``short_duration_s / duration_s``.

Besides ``set`` (impairments), a step may ``do`` one of the things a laptop's
network does to it (:data:`STEP_KINDS`): an interface appears
(``add-interface``, for a path declared ``present = false`` or deleted
earlier) or vanishes (``delete-interface``), its address is flushed
(``flush-address``) or a new one is added, possibly in another subnet with
another next hop (``add-address``, ``subnet``, ``host``), and the gateway
process is killed (``kill-gateway``, SIGKILL) and started again
(``start-gateway``), and the laptop sleeps (``suspend``) and wakes
(``resume``, with ``slept_s``: how long the machine's clock says it slept,
which may be far longer than the wall time between the two steps: the lab
moves the processes' clocks by the difference).  The parser plays the timeline through once, so a step
that cannot happen (delete an interface that is not there, start a gateway
that runs) is an error naming the step, not a surprise half-way through a run.
Only the lab carries ``do`` steps out; the demo has no interfaces to change.

Example::

    name = "commute"
    description = "Wi-Fi to LTE and back, as on a train"
    duration_s = 60.0
    short_duration_s = 20.0

    [[path]]
    name = "wifi0"
    kind = "wifi"
    priority = 20
    delay_ms = 8.0

    [[step]]
    at_s = 10.0
    path = "wifi0"
    set = { loss_pct = 25.0 }
    note = "Wi-Fi degrades"
"""

from __future__ import annotations

import pathlib
from typing import Any, Mapping

import attrs

from jvpn_trio.config import PATH_KINDS, ConfigError, policy_from_table, read_toml
from jvpn_trio.core.policy import Policy
from jvpn_trio.lab.netns import CLIENT_HOST, MAX_HOST, ROUTER_HOST


class ScenarioError(ConfigError):
    """A scenario file that cannot be used; one line naming where and why."""


#: What a step may set, and the type of each value.
IMPAIRMENTS: Mapping[str, type | tuple[type, ...]] = {
    "link": str,  # "up" | "down"
    "blackhole": bool,
    "loss_pct": (int, float),
    "delay_ms": (int, float),
    "jitter_ms": (int, float),
    "rate_mbit": (int, float),
    "restore": bool,  # back to the path's baseline, link up
}
LINK_STATES = ("up", "down")
ALL_PATHS = "*"
#: The ``path`` a gateway step reports (it names no path: there is no ``path`` key in the file).
GATEWAY_TARGET = "@gateway"
#: The ``path`` a suspend or resume step reports.
LAPTOP_TARGET = "@laptop"

ADD_INTERFACE = "add-interface"
DELETE_INTERFACE = "delete-interface"
FLUSH_ADDRESS = "flush-address"
ADD_ADDRESS = "add-address"
KILL_GATEWAY = "kill-gateway"
START_GATEWAY = "start-gateway"
FREEZE_GATEWAY = "freeze-gateway"
THAW_GATEWAY = "thaw-gateway"
SUSPEND = "suspend"
RESUME = "resume"
#: What ``do = ...`` may say: the faults of a laptop's network that are not impairments.
STEP_KINDS = (
    ADD_INTERFACE, DELETE_INTERFACE, FLUSH_ADDRESS, ADD_ADDRESS, KILL_GATEWAY, START_GATEWAY, FREEZE_GATEWAY,
    THAW_GATEWAY, SUSPEND, RESUME,
)  # fmt: skip
GATEWAY_STEP_KINDS = (KILL_GATEWAY, START_GATEWAY, FREEZE_GATEWAY, THAW_GATEWAY)
#: Steps about the whole laptop: they name no path.
MACHINE_STEP_KINDS = (SUSPEND, RESUME)
#: ``resume``: the longest sleep a scenario may claim (a day), in seconds.
MAX_SLEPT_S = 86_400.0
#: ``add-address``: ``subnet`` 0 is the path's own link subnet; 1..MAX_SUBNET are others, each with
#: its own next hop on the router side.  ``host`` is the client's host number in it (the lab's
#: address plan: ``ROUTER_HOST`` is the router).
MAX_SUBNET = 3
DEFAULT_HOST = CLIENT_HOST
MIN_HOST = ROUTER_HOST + 1


@attrs.frozen(kw_only=True)
class Impairment:
    """A path's conditions.  ``None`` rate means unlimited."""

    link_up: bool = True
    blackhole: bool = False
    loss_pct: float = 0.0
    delay_ms: float = 0.0
    jitter_ms: float = 0.0
    rate_mbit: float | None = None

    def apply(self, changes: Mapping[str, Any], baseline: Impairment) -> Impairment:
        """The conditions after a step's ``set`` table (``restore`` first, then the rest)."""
        current = baseline if changes.get("restore") else self
        updates: dict[str, Any] = {}
        for key, value in changes.items():
            if key == "restore":
                continue
            if key == "link":
                updates["link_up"] = value == "up"
            elif key == "rate_mbit":
                updates["rate_mbit"] = float(value) if value > 0 else None
            else:
                updates[key] = float(value) if key != "blackhole" else value
        return attrs.evolve(current, **updates)


@attrs.frozen(kw_only=True)
class ScenarioPath:
    name: str
    kind: str
    priority: int
    baseline: Impairment
    #: False: the interface does not exist when the session starts; an ``add-interface`` step creates it.
    present: bool = True


@attrs.frozen(kw_only=True)
class Step:
    at_s: float
    path: str  # a path name, "*", or GATEWAY_TARGET for a gateway step
    changes: tuple[tuple[str, Any], ...] = ()
    note: str = ""
    #: One of STEP_KINDS, or None for an impairment step (``changes``).
    kind: str | None = None
    #: ``add-address`` only: which subnet and which host number the new address has.
    subnet: int = 0
    host: int = DEFAULT_HOST
    #: ``resume`` only: the suspend's length on the laptop's clock (None: the wall time since ``suspend``).
    slept_s: float | None = None

    def targets(self, paths: tuple[ScenarioPath, ...]) -> list[ScenarioPath]:
        """The paths the step names (every path for ``*``; none for a gateway step)."""
        return list(paths) if self.path == ALL_PATHS else [p for p in paths if p.name == self.path]

    def what(self) -> str:
        """The step's change as text: the ``set`` table, or the kind and its arguments."""
        if self.kind is None:
            return ", ".join(f"{k}={v}" for k, v in self.changes)
        if self.kind == ADD_ADDRESS:
            return f"{self.kind} subnet={self.subnet} host={self.host}"
        if self.kind == RESUME and self.slept_s is not None:
            return f"{self.kind} slept_s={self.slept_s:g}"
        return self.kind

    def describe(self) -> str:
        where = {GATEWAY_TARGET: "gateway", LAPTOP_TARGET: "laptop"}.get(self.path, self.path)
        return f"{where}: {self.what()}" + (f" ({self.note})" if self.note else "")


DEFAULT_PATHS = (
    ScenarioPath(name="eth0", kind="ethernet", priority=10, baseline=Impairment()),
    ScenarioPath(name="wifi0", kind="wifi", priority=20, baseline=Impairment()),
    ScenarioPath(name="lte0", kind="lte", priority=30, baseline=Impairment()),
)


@attrs.frozen(kw_only=True)
class Scenario:
    name: str
    description: str
    duration_s: float
    short_duration_s: float
    paths: tuple[ScenarioPath, ...]
    steps: tuple[Step, ...]
    policy: Policy

    def short(self) -> Scenario:
        """The CI form: same steps, every time scaled to ``short_duration_s``."""
        factor = self.short_duration_s / self.duration_s
        return attrs.evolve(
            self,
            duration_s=self.short_duration_s,
            steps=tuple(attrs.evolve(s, at_s=round(s.at_s * factor, 6)) for s in self.steps),
        )

    def present_at_start(self) -> tuple[ScenarioPath, ...]:
        return tuple(p for p in self.paths if p.present)

    def conditions_at(self, t: float) -> dict[str, Impairment]:
        """Every path's conditions after all steps up to and including time ``t``."""
        state = {p.name: p.baseline for p in self.paths}
        for step in self.steps:
            if step.at_s > t:
                break
            for p in step.targets(self.paths):
                state[p.name] = state[p.name].apply(dict(step.changes), p.baseline)
        return state

    def path(self, name: str) -> ScenarioPath:
        for p in self.paths:
            if p.name == name:
                return p
        raise KeyError(name)


def _number(table: Mapping[str, Any], key: str, where: str, *, default: float | None = None, lo: float = 0.0) -> float:
    if key not in table:
        if default is None:
            raise ScenarioError(f"{where}: missing {key!r}")
        return default
    value = table[key]
    if not isinstance(value, (int, float)) or isinstance(value, bool) or value < lo:
        raise ScenarioError(f"{where}.{key}: expected a number >= {lo}, got {value!r}")
    return float(value)


def _check_changes(changes: Any, where: str) -> tuple[tuple[str, Any], ...]:
    if not isinstance(changes, dict) or not changes:
        raise ScenarioError(f"{where}.set: expected a non-empty table of impairments")
    for key, value in changes.items():
        kind = IMPAIRMENTS.get(key)
        if kind is None:
            raise ScenarioError(f"{where}.set: unknown impairment {key!r} (known: {', '.join(IMPAIRMENTS)})")
        if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
            raise ScenarioError(f"{where}.set.{key}: wrong type {type(value).__name__}")
        if key == "link" and value not in LINK_STATES:
            raise ScenarioError(f"{where}.set.link: expected 'up' or 'down', got {value!r}")
        number = float(value) if isinstance(value, (int, float)) else 0.0
        if key == "loss_pct" and not 0 <= number <= 100:
            raise ScenarioError(f"{where}.set.loss_pct: {value} is not a percentage")
        if key in ("delay_ms", "jitter_ms", "rate_mbit") and number < 0:
            raise ScenarioError(f"{where}.set.{key}: must not be negative")
    return tuple(sorted(changes.items()))


def _integer(raw: Mapping[str, Any], key: str, where: str, *, default: int, lo: int, hi: int) -> int:
    value = raw.get(key, default)
    if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
        raise ScenarioError(f"{where}.{key}: expected an integer {lo}..{hi}, got {value!r}")
    return value


def _step(raw: Mapping[str, Any], where: str, *, duration: float, names: set[str]) -> Step:
    """One ``[[step]]`` table: an impairment (``set``) or a network event (``do``)."""
    kind = raw.get("do")
    allowed = {"at_s", "path", "note"}
    if kind is None:
        allowed.add("set")
    elif kind == ADD_ADDRESS:
        allowed |= {"do", "subnet", "host"}
    elif kind == RESUME:
        allowed |= {"do", "slept_s"}
    else:
        allowed.add("do")
    if kind is not None and "set" in raw:
        raise ScenarioError(f"{where}: give 'set' or 'do', not both")
    if kind in GATEWAY_STEP_KINDS or kind in MACHINE_STEP_KINDS:
        allowed.discard("path")
    extra = sorted(set(raw) - allowed)
    if extra:
        raise ScenarioError(f"{where}: unknown key(s) for this step: {', '.join(extra)}")
    if kind is not None and kind not in STEP_KINDS:
        raise ScenarioError(f"{where}.do: expected one of {', '.join(STEP_KINDS)}, got {kind!r}")
    at = _number(raw, "at_s", where)
    if at > duration:
        raise ScenarioError(f"{where}.at_s: {at} is after the end ({duration} s)")
    if kind is not None and at == 0.0:
        raise ScenarioError(f"{where}.at_s: a '{kind}' step must come after the start (use present = false for a path absent at start)")
    note = raw.get("note", "")
    if not isinstance(note, str):
        raise ScenarioError(f"{where}.note: expected a string")
    if kind in GATEWAY_STEP_KINDS:
        return Step(at_s=at, path=GATEWAY_TARGET, kind=kind, note=note)
    if kind in MACHINE_STEP_KINDS:
        slept = _number(raw, "slept_s", where) if "slept_s" in raw else None
        if slept is not None and not 0 < slept <= MAX_SLEPT_S:
            raise ScenarioError(f"{where}.slept_s: expected more than 0 and at most {MAX_SLEPT_S:g} s, got {slept:g}")
        return Step(at_s=at, path=LAPTOP_TARGET, kind=kind, slept_s=slept, note=note)
    target = raw.get("path")
    if kind is None:
        if target != ALL_PATHS and target not in names:
            raise ScenarioError(f"{where}.path: {target!r} is not a path of this scenario ({', '.join(sorted(names))} or '*')")
        return Step(at_s=at, path=target, changes=_check_changes(raw.get("set"), where), note=note)
    if target not in names:
        raise ScenarioError(f"{where}.path: {target!r} is not a path of this scenario ({', '.join(sorted(names))}); '{kind}' takes one path")
    subnet = _integer(raw, "subnet", where, default=0, lo=0, hi=MAX_SUBNET)
    host = _integer(raw, "host", where, default=DEFAULT_HOST, lo=MIN_HOST, hi=MAX_HOST)
    return Step(at_s=at, path=target, kind=kind, subnet=subnet, host=host, note=note)


def _check_timeline(steps: list[tuple[int, Step]], paths: tuple[ScenarioPath, ...], *, source: str) -> None:
    """Play the steps through once: each must be possible when it comes (ScenarioError naming it).

    Also keeps delay and jitter off paths whose interface is ever absent: the lab's relay taps
    the devices that exist when the run starts.
    """
    present = {p.name: p.present for p in paths}
    addressed = {p.name: p.present for p in paths}
    gateway_up = True
    gateway_frozen = False
    asleep_since: float | None = None
    ever_absent = {p.name for p in paths if not p.present}
    delayed = {p.name for p in paths if p.baseline.delay_ms or p.baseline.jitter_ms}
    for number, step in steps:
        where = f"{source}: [[step]] #{number} (at {step.at_s:g} s, {step.what()})"
        if step.kind is None:
            if step.path != ALL_PATHS and not present[step.path]:
                raise ScenarioError(f"{where}: {step.path} has no interface then (add it with do = '{ADD_INTERFACE}')")
            changes = dict(step.changes)
            if changes.get("delay_ms") or changes.get("jitter_ms"):
                delayed |= {p.name for p in step.targets(paths)}
        elif step.kind == SUSPEND:
            if asleep_since is not None:
                raise ScenarioError(f"{where}: the laptop is asleep then (resume it first)")
            asleep_since = step.at_s
        elif step.kind == RESUME:
            if asleep_since is None:
                raise ScenarioError(f"{where}: the laptop is not asleep then (suspend it first)")
            wall = step.at_s - asleep_since
            if step.slept_s is not None and step.slept_s < wall:
                raise ScenarioError(f"{where}.slept_s: {step.slept_s:g} s is shorter than the {wall:g} s since the suspend")
            asleep_since = None
        elif step.kind in GATEWAY_STEP_KINDS:
            if asleep_since is not None:
                raise ScenarioError(f"{where}: the laptop is asleep then; gateway steps are not simulated during a suspend")
            if step.kind in (FREEZE_GATEWAY, THAW_GATEWAY):
                freeze = step.kind == FREEZE_GATEWAY
                if not gateway_up or gateway_frozen == freeze:
                    state = "not running" if not gateway_up else "frozen" if gateway_frozen else "not frozen"
                    raise ScenarioError(f"{where}: the gateway is {state} then")
                gateway_frozen = freeze
                continue
            if gateway_frozen:
                raise ScenarioError(f"{where}: the gateway is frozen then (thaw it first)")
            wanted = step.kind == START_GATEWAY
            if gateway_up == wanted:
                raise ScenarioError(f"{where}: the gateway is {'running' if gateway_up else 'not running'} then")
            gateway_up = wanted
        elif step.kind == ADD_INTERFACE:
            if present[step.path]:
                raise ScenarioError(f"{where}: {step.path} exists then (declare it present = false, or delete it first)")
            present[step.path] = addressed[step.path] = True
        else:
            if not present[step.path]:
                raise ScenarioError(f"{where}: {step.path} has no interface then")
            if step.kind == DELETE_INTERFACE:
                present[step.path] = addressed[step.path] = False
                ever_absent.add(step.path)
            elif step.kind == FLUSH_ADDRESS:
                if not addressed[step.path]:
                    raise ScenarioError(f"{where}: {step.path} has no address then")
                addressed[step.path] = False
            else:
                addressed[step.path] = True
    if asleep_since is not None:
        raise ScenarioError(f"{source}: the laptop is still asleep at the end (add a '{RESUME}' step)")
    if gateway_frozen:
        raise ScenarioError(f"{source}: the gateway is still frozen at the end (add a '{THAW_GATEWAY}' step)")
    both = sorted(ever_absent & delayed)
    if both:
        raise ScenarioError(f"{source}: {', '.join(both)}: a path whose interface comes or goes cannot have a delay or jitter")


def scenario_from_mapping(data: Mapping[str, Any], *, source: str) -> Scenario:
    known = {"name", "description", "duration_s", "short_duration_s", "path", "step", "policy"}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ScenarioError(f"{source}: unknown key(s): {', '.join(unknown)}")
    name = data.get("name", pathlib.Path(source).stem)
    if not isinstance(name, str):
        raise ScenarioError(f"{source}: name must be a string")
    duration = _number(data, "duration_s", source, lo=0.001)
    short = _number(data, "short_duration_s", source, default=duration, lo=0.001)
    if short > duration:
        raise ScenarioError(f"{source}: short_duration_s ({short}) exceeds duration_s ({duration})")
    paths: tuple[ScenarioPath, ...] = DEFAULT_PATHS
    if "path" in data:
        raw_paths = data["path"]
        if not isinstance(raw_paths, list) or not raw_paths:
            raise ScenarioError(f"{source}: [[path]] must be a non-empty array of tables")
        built = []
        for i, raw in enumerate(raw_paths):
            where = f"{source}: [[path]] #{i + 1}"
            if not isinstance(raw, dict):
                raise ScenarioError(f"{where}: expected a table")
            extra = sorted(set(raw) - {"name", "kind", "priority", "delay_ms", "jitter_ms", "loss_pct", "rate_mbit", "present"})
            if extra:
                raise ScenarioError(f"{where}: unknown key(s): {', '.join(extra)}")
            pname, kind, prio = raw.get("name"), raw.get("kind"), raw.get("priority", 10 * (i + 1))
            if not isinstance(pname, str) or not pname or pname == ALL_PATHS:
                raise ScenarioError(f"{where}.name: expected an interface name")
            if kind not in PATH_KINDS:
                raise ScenarioError(f"{where}.kind: expected one of {', '.join(PATH_KINDS)}, got {kind!r}")
            if not isinstance(prio, int) or isinstance(prio, bool) or prio < 1:
                raise ScenarioError(f"{where}.priority: expected a positive integer")
            rate = _number(raw, "rate_mbit", where, default=0.0)
            baseline = Impairment(
                delay_ms=_number(raw, "delay_ms", where, default=0.0),
                jitter_ms=_number(raw, "jitter_ms", where, default=0.0),
                loss_pct=_number(raw, "loss_pct", where, default=0.0),
                rate_mbit=rate or None,
            )
            present = raw.get("present", True)
            if not isinstance(present, bool):
                raise ScenarioError(f"{where}.present: expected true or false, got {present!r}")
            built.append(ScenarioPath(name=pname, kind=kind, priority=prio, baseline=baseline, present=present))
        if len({p.name for p in built}) != len(built):
            raise ScenarioError(f"{source}: two [[path]] entries share a name")
        paths = tuple(built)
    names = {p.name for p in paths}
    raw_steps = data.get("step", [])
    if not isinstance(raw_steps, list):
        raise ScenarioError(f"{source}: [[step]] must be an array of tables")
    numbered = []
    for i, raw in enumerate(raw_steps):
        where = f"{source}: [[step]] #{i + 1}"
        if not isinstance(raw, dict):
            raise ScenarioError(f"{where}: expected a table")
        numbered.append((i + 1, _step(raw, where, duration=duration, names=names)))
    numbered.sort(key=lambda pair: pair[1].at_s)  # stable: same-time steps keep file order
    _check_timeline(numbered, paths, source=source)
    ordered = tuple(step for _number_in_file, step in numbered)
    description = data.get("description", "")
    if not isinstance(description, str):
        raise ScenarioError(f"{source}: description must be a string")
    return Scenario(
        name=name,
        description=description,
        duration_s=duration,
        short_duration_s=short,
        paths=paths,
        steps=ordered,
        policy=policy_from_table(data.get("policy", {}), source=source),
    )


def load_scenario(path: str | pathlib.Path) -> Scenario:
    return scenario_from_mapping(read_toml(path), source=str(path))


#: The scenarios shipped with the package (``examples/scenarios`` in a checkout links here).
SCENARIO_DIR = pathlib.Path(__file__).resolve().parent / "scenarios"


def shipped_scenario(name: str) -> pathlib.Path:
    """The path of a scenario shipped with the package, e.g. ``shipped_scenario("demo")``."""
    return SCENARIO_DIR / f"{name}.toml"
