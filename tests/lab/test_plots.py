"""``jvpn-trio bench --plots`` / ``--replot``: the PNGs drawn from a bench report's JSON document.

Determinism rules: the report is built by hand through the bench's own types (``BenchReport``,
``SystemResult``, ``Outage``) and goes through ``to_json`` and a JSON round trip, so these tests
break when the report's shape changes under the plots.  Outage timelines come from synthetic
1 kHz arrival lists through the bench's own :func:`outage_from_arrivals`.  No clock, no root,
nothing measured, nothing timed.
matplotlib is in the ``test`` extra, so CI runs these (a skip would hide a broken extra).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import attrs
import pytest

from jvpn_trio.lab import bench, bench_report, plots
from jvpn_trio.lab.bench import (
    BenchReport,
    BenchSettings,
    Outage,
    SystemResult,
    UdpResult,
)
from jvpn_trio.lab.bench_report import (
    BASELINE,
    BLACKHOLE,
    JVPN,
    LINK_DOWN,
    MEASURED,
    NOT_AVAILABLE,
    OPENVPN,
    WIREGUARD,
)
from jvpn_trio.lab.traffic import Gap

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
#: An empty canvas of these sizes compresses to a few kB; drawn bars, points and text make it larger.
MIN_PNG_BYTES = 10_000


def _o(seconds: float, recovered: bool = True) -> Outage:
    return Outage(seconds=seconds, recovered=recovered, window_s=3.0, path="eth0")


def _report(*, with_idle: bool = False) -> BenchReport:
    settings = BenchSettings(runs=3, iperf_s=3.0, fault_s=3.0, systems=(BASELINE, JVPN, OPENVPN, WIREGUARD),
                             fault_runs=3)  # fmt: skip
    baseline = SystemResult(key=BASELINE, status=MEASURED, tcp_mbit_runs=(15000.0, 14000.0, 16000.0),
                            tcp_down_mbit_runs=(16000.0, 15000.0, 17000.0),
                            udp64_runs=(UdpResult(200_000.0, 100_000.0, 50.0),))  # fmt: skip
    jvpn = SystemResult(
        key=JVPN, status=MEASURED, tcp_mbit_runs=(375.0, 380.0, 300.0), tcp_down_mbit_runs=(340.0, 320.0, 360.0),
        udp64_runs=(UdpResult(240_000.0, 20_000.0, 91.0), UdpResult(240_000.0, 24_000.0, 90.0)),
        outages={LINK_DOWN: (_o(0.012), _o(0.014), _o(0.0)), BLACKHOLE: (_o(0.31), _o(0.29), _o(2.99, False))},
    )  # fmt: skip
    openvpn = SystemResult(
        key=OPENVPN, status=MEASURED, tcp_mbit_runs=(600.0,), tcp_down_mbit_runs=(400.0,),
        udp64_runs=(UdpResult(390_000.0, 40_000.0, 88.0),),
        outages={LINK_DOWN: (_o(0.011), _o(0.010), _o(0.012)),
                 BLACKHOLE: (_o(2.99, False), _o(2.99, False), _o(2.99, False))},
    )  # fmt: skip
    wireguard = SystemResult(key=WIREGUARD, status=NOT_AVAILABLE, reason="wireguard-go is not installed")
    host = {"cpus": 2, "kernel": "6.18", "loadavg_start": "1.00 1.00 1.00", "loadavg_end": "1.20 1.00 1.00"}
    idle = None
    if with_idle:
        idle = bench.IdleSection(seconds=10.0, results=(
            bench.IdleResult(key=bench.PER_ROLE, status=MEASURED, overrides={},
                             failovers=(_o(0.4), _o(0.5)), idle_failovers=(_o(1.1), _o(3.0, False))),
        ))  # fmt: skip
    results = (baseline, jvpn, openvpn, wireguard, bench.wireguard_reference())
    return BenchReport(settings, results, host, "2026-12-03 03:00", 150.0, idle)


def _document(report: BenchReport) -> dict[str, Any]:
    """What ``--json`` writes and ``--replot`` reads."""
    doc: dict[str, Any] = json.loads(json.dumps(report.to_json()))
    return doc


def _png_size(path: Path) -> tuple[int, int]:
    from matplotlib import image

    pixels = image.imread(path)
    return pixels.shape[1], pixels.shape[0]


def test_both_figures_are_real_pngs_of_the_configured_size(tmp_path: Path) -> None:
    drawn = plots.render_all(_document(_report(with_idle=True)), tmp_path / "plots")
    assert [d.path.name for d in drawn] == [plots.THROUGHPUT_FILE, plots.OUTAGES_FILE]
    for figure in drawn:
        data = figure.path.read_bytes()
        assert data.startswith(PNG_SIGNATURE)
        assert len(data) > MIN_PNG_BYTES
    width, height = plots.THROUGHPUT_SIZE_IN
    assert _png_size(drawn[0].path) == (round(width * plots.DPI), round(height * plots.DPI))
    panel_width, panel_height = plots.OUTAGE_PANEL_SIZE_IN
    panels = 2 + len(plots.IDLE_FAILOVERS)  # link down, blackhole, and the idle section's two
    assert _png_size(drawn[1].path) == (round(panel_width * panels * plots.DPI), round(panel_height * plots.DPI))


def test_the_plot_data_reads_the_reports_figures_subtitle_and_ratios() -> None:
    data = plots.plot_data(_document(_report()))
    assert data.subtitle.startswith("2026-12-03 03:00 UTC") and "2 CPUs" in data.subtitle and "kernel 6.18" in data.subtitle
    tcp, down, udp = data.throughput
    assert [(b.system, b.value, b.reference) for b in tcp.bars] == [
        ("bare veth", 15000.0, False), ("jvpn-trio", 375.0, False), ("OpenVPN", 600.0, False),
        (bench_report.LABELS[bench_report.WIREGUARD_REFERENCE], 413.0, True),
    ]  # fmt: skip
    assert tcp.bars[1].runs == (375.0, 380.0, 300.0)
    assert tcp.ratios == ("jvpn / bare 0.025×", "jvpn / OpenVPN 0.62×")
    # The download: every measured system, no reference bar (peers.md has no download figure).
    assert (down.metric, down.title, down.unit) == ("tcp_down_mbit", "TCP download, one stream", "Mbit/s")
    assert [(b.system, b.value, b.reference) for b in down.bars] == [
        ("bare veth", 16000.0, False), ("jvpn-trio", 340.0, False), ("OpenVPN", 400.0, False),
    ]  # fmt: skip
    assert down.bars[1].runs == (340.0, 320.0, 360.0)
    assert down.ratios == ("jvpn / bare 0.021×", "jvpn / OpenVPN 0.85×")
    assert [b.value for b in udp.bars[:3]] == [100_000.0, 22_000.0, 40_000.0]
    assert any(n.startswith("wireguard-go: not available: wireguard-go is not installed") for n in data.notes)
    assert [p.fault for p in data.outages] == [LINK_DOWN, BLACKHOLE]
    assert data.outages[1].systems == ("jvpn-trio", "OpenVPN")  # the reference has no same-run trials
    assert data.outages[1].medians["OpenVPN"] == (2.99, False)


def test_trials_without_recovery_are_drawn_not_dropped(tmp_path: Path) -> None:
    drawn = plots.render_outages(plots.plot_data(_document(_report())), tmp_path / "outages.png")
    blackhole = [item for item in drawn.items if item.startswith(f"{BLACKHOLE}: ")]
    assert f"{BLACKHOLE}: OpenVPN, trial 1: > 2.990 s (no recovery)" in blackhole
    assert sum("OpenVPN, trial" in item for item in blackhole) == 3
    assert f"{BLACKHOLE}: jvpn-trio, trial 3: > 2.990 s (no recovery)" in blackhole
    assert f"{BLACKHOLE}: OpenVPN, median: > 2.990 s (no recovery)" in blackhole
    assert f"{LINK_DOWN}: jvpn-trio, trial 3: 0.000 s" in drawn.items  # a 0 s outage is a point too
    assert sum(": jvpn-trio, trial" in item or ": OpenVPN, trial" in item for item in drawn.items) == 12


def test_throughput_lists_every_bar_including_the_labelled_reference(tmp_path: Path) -> None:
    drawn = plots.render_throughput(plots.plot_data(_document(_report())), tmp_path / "t.png")
    assert "tcp_mbit: jvpn-trio: 375.0 Mbit/s" in drawn.items
    assert "tcp_down_mbit: jvpn-trio: 340.0 Mbit/s" in drawn.items
    assert not any(i.startswith("tcp_down_mbit: wireguard-go (peers.md") for i in drawn.items)
    assert any(i.startswith("udp64_pps: wireguard-go (peers.md") and i.endswith("(reference, not this run)")
               for i in drawn.items)  # fmt: skip


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        ({"hello": "world"}, 'not a jvpn-trio bench report (no "benchmark": "jvpn-trio bench")'),
        ([1, 2], 'not a jvpn-trio bench report (no "benchmark": "jvpn-trio bench")'),
        ({"benchmark": "jvpn-trio bench"}, "not a jvpn-trio bench report: no systems"),
        ({"benchmark": "jvpn-trio bench", "systems": {"x": {"label": "x", "status": "measured", "tcp_mbit": "fast"}}},
         "not a jvpn-trio bench report: systems.x.tcp_mbit is str"),
        ({"benchmark": "jvpn-trio bench",
          "systems": {"x": {"label": "x", "status": "measured", "tcp_down_mbit": 3.0, "tcp_down_mbit_runs": [True]}}},
         "not a jvpn-trio bench report: systems.x.tcp_down_mbit_runs[0] is not a finite number"),
    ],
)  # fmt: skip
def test_a_document_that_is_not_a_report_is_one_line(doc: Any, message: str) -> None:
    with pytest.raises(plots.NotAReport) as info:
        plots.plot_data(doc)
    assert str(info.value) == message


#: A report the bench wrote before it measured the TCP download (no ``tcp_down_mbit`` anywhere).
SAVED_BEFORE_DOWNLOAD = Path(__file__).resolve().parents[2] / "docs" / "img" / "bench-2026-12-03-1654.json"


def _without_download(doc: dict[str, Any]) -> dict[str, Any]:
    """``doc`` as the bench wrote it before the download test: no download figures, rows or CPU."""
    for entry in doc["systems"].values():
        for field in ("tcp_down_mbit", "tcp_down_mbit_runs"):
            entry.pop(field, None)
        entry.get("cpu_cores", {}).pop("tcp_down", None)
    for by_metric in doc["ratios"].values():
        for metric in ("tcp_down_mbit", "cpu_tcp_down"):
            by_metric.pop(metric, None)
    return doc


@pytest.mark.parametrize("source", ["saved", "stripped"])
def test_a_report_from_before_the_download_test_still_loads_and_plots(tmp_path: Path, source: str) -> None:
    doc = json.loads(SAVED_BEFORE_DOWNLOAD.read_text()) if source == "saved" else _without_download(_document(_report()))
    assert not any("tcp_down_mbit" in entry for entry in doc["systems"].values())
    data = plots.plot_data(doc)
    tcp, down, udp = data.throughput
    assert tcp.bars and udp.bars and (down.bars, down.ratios) == ((), ())
    drawn = plots.render_all(doc, tmp_path)
    assert drawn[0].path.name == plots.THROUGHPUT_FILE and drawn[0].path.read_bytes().startswith(PNG_SIGNATURE)
    assert any(i.startswith("tcp_mbit: jvpn-trio: ") for i in drawn[0].items)
    assert not any(i.startswith("tcp_down_mbit: ") for i in drawn[0].items)


def test_missing_matplotlib_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # import fails as if not installed
    with pytest.raises(plots.PlotsUnavailable, match=r"pip install 'jvpn-trio\[plots\]'"):
        plots.require_matplotlib()


# -- the command line --------------------------------------------------------------------------------


def _main(*argv: str) -> int:
    return bench.main(bench.build_parser().parse_args(list(argv)))


def test_replot_renders_a_saved_report_without_root(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr("os.geteuid", lambda: 1000)  # not root: --replot measures nothing
    saved = tmp_path / "report.json"
    saved.write_text(json.dumps(_report().to_json()))
    assert _main("--replot", str(saved), "--plots", str(tmp_path / "out")) == 0
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted([plots.THROUGHPUT_FILE, plots.OUTAGES_FILE])
    assert "wrote" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ('{"hello": "world"}', 'not a jvpn-trio bench report (no "benchmark": "jvpn-trio bench")'),
        ("{not json", "Expecting property name enclosed in double quotes"),
        (None, "No such file or directory"),
    ],
)
def test_replot_of_bad_input_is_one_line_and_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], content: str | None, expected: str
) -> None:
    path = tmp_path / "input.json"
    if content is not None:
        path.write_text(content)
    assert _main("--replot", str(path), "--plots", str(tmp_path / "out")) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.count("\n") == 1 and "Traceback" not in captured.err
    assert captured.err.startswith(f"jvpn-trio bench: {path}: ") and expected in captured.err
    assert not (tmp_path / "out").exists()


def test_replot_without_plots_dir_is_a_usage_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert _main("--replot", str(tmp_path / "r.json")) == 2
    assert capsys.readouterr().err == "jvpn-trio bench: --replot needs --plots DIR (where to write the PNGs)\n"


def test_plots_without_matplotlib_refuse_before_the_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    monkeypatch.setattr(bench, "_preflight", lambda: pytest.fail("the run must not start"))
    assert _main("--quick", "--plots", str(tmp_path / "out")) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pip install 'jvpn-trio[plots]'" in err


def test_the_bench_and_its_plots_module_load_matplotlib_only_to_draw() -> None:
    """``--plots`` is optional: the bench (and importing the plots module) runs without matplotlib."""
    from tests.test_import_weight import loaded, modules_after

    modules = modules_after("import jvpn_trio.lab.bench, jvpn_trio.lab.plots")
    assert "jvpn_trio.lab.plots" in modules
    assert loaded(modules, ("matplotlib",)) == []


# -- outage timelines: what a fault trial keeps of its probe arrivals, and their figure ----------------------------

#: A synthetic 1 kHz stream: probes every millisecond, in integer milliseconds to keep the arithmetic exact.
STREAM_MS = 1000.0


def _stream(start_ms: int, end_ms: int) -> list[float]:
    """Arrivals every millisecond in ``[start_ms, end_ms)``, in seconds."""
    return [ms / STREAM_MS for ms in range(start_ms, end_ms)]


def test_a_timeline_keeps_the_arrivals_nearest_the_gap_relative_to_the_fault() -> None:
    # Fault at 10.000 s; the stream stops after 10.004 s and comes back at 10.300 s.
    arrivals = _stream(9_000, 10_005) + _stream(10_300, 12_000)
    outage = bench.outage_from_arrivals(arrivals, fault_start=10.0, fault_end=12.0, stream_end=13.0, path="eth0",
                                        context=3)  # fmt: skip
    line = outage.timeline
    assert line is not None
    assert line.gap_start_s == pytest.approx(0.004) and line.gap_end_s == pytest.approx(0.300)
    assert line.arrivals_s == pytest.approx((0.002, 0.003, 0.004, 0.300, 0.301, 0.302))
    assert outage.seconds == pytest.approx(line.gap_end_s - line.gap_start_s)


def test_a_timeline_includes_the_stream_before_the_fault_when_the_gap_starts_at_it() -> None:
    arrivals = _stream(9_990, 10_000) + _stream(10_050, 11_000)
    outage = bench.outage_from_arrivals(arrivals, fault_start=10.0, fault_end=11.0, stream_end=11.0, path="eth0",
                                        context=2)  # fmt: skip
    assert outage.timeline is not None
    assert outage.timeline.gap_start_s == pytest.approx(0.0)
    assert outage.timeline.arrivals_s == pytest.approx((-0.002, -0.001, 0.050, 0.051))


def test_a_timeline_is_bounded_however_long_the_stream() -> None:
    arrivals = _stream(0, 20_000) + _stream(20_500, 60_000)  # 59 500 arrivals
    outage = bench.outage_from_arrivals(arrivals, fault_start=20.0, fault_end=40.0, stream_end=60.0, path="eth0")
    assert outage.timeline is not None
    assert len(outage.timeline.arrivals_s) == 2 * bench.TIMELINE_CONTEXT_PROBES
    assert len(json.dumps(outage.to_json())) < 30 * 2 * bench.TIMELINE_CONTEXT_PROBES  # a few dozen bytes per arrival


def test_an_unrecovered_timeline_shows_the_stream_returning_after_the_fault_was_removed() -> None:
    arrivals = _stream(9_998, 10_000) + _stream(12_010, 12_020)  # back only after the removal at 12.0 s
    outage = bench.outage_from_arrivals(arrivals, fault_start=10.0, fault_end=12.0, stream_end=13.0, path="eth0",
                                        context=2)  # fmt: skip
    assert not outage.recovered and outage.timeline is not None
    assert outage.timeline.gap_end_s == pytest.approx(2.0)  # the window's end: a lower bound
    assert outage.timeline.arrivals_s == pytest.approx((-0.002, -0.001, 2.010, 2.011))


def test_a_timeline_does_not_depend_on_the_arrivals_order_and_counts_an_edge_once() -> None:
    arrivals = _stream(9_995, 10_010) + _stream(10_100, 10_110)
    forward = bench.outage_from_arrivals(arrivals, fault_start=10.0, fault_end=11.0, stream_end=11.0, path="eth0")
    backward = bench.outage_from_arrivals(arrivals[::-1], fault_start=10.0, fault_end=11.0, stream_end=11.0,
                                          path="eth0")  # fmt: skip
    assert forward == backward
    edge = bench.arrival_timeline([1.0], Gap(1.0, 1.0), fault_start=1.0, context=5)
    assert edge.arrivals_s == (0.0,)
    with pytest.raises(ValueError):
        bench.arrival_timeline([], Gap(0.0, 1.0), fault_start=0.0, context=-1)


def test_an_outage_without_a_timeline_keeps_the_older_json_shape() -> None:
    assert "timeline" not in _o(0.2).to_json()
    with_line = bench.outage_from_arrivals(_stream(0, 10) + _stream(20, 30), fault_start=0.005, fault_end=0.1,
                                           stream_end=0.1, path="eth0")  # fmt: skip
    assert set(with_line.to_json()["timeline"]) == {"gap_start_s", "gap_end_s", "arrivals_s"}


def _timed(gap_start_ms: int, gap_end_ms: int, *, fault_ms: int = 1000, fault_s: float = 3.0) -> Outage:
    """A trial measured from a synthetic stream that stops at ``gap_start_ms`` and resumes at ``gap_end_ms``."""
    arrivals = _stream(0, gap_start_ms + 1) + _stream(gap_end_ms, fault_ms + int(fault_s * STREAM_MS) + 500)
    return bench.outage_from_arrivals(arrivals, fault_start=fault_ms / STREAM_MS,
                                      fault_end=fault_ms / STREAM_MS + fault_s, stream_end=10.0, path="eth0")  # fmt: skip


def _report_with_timelines() -> BenchReport:
    report = _report()
    timed = {
        JVPN: {LINK_DOWN: (_timed(1_002, 1_014), _timed(1_001, 1_012)), BLACKHOLE: (_timed(1_000, 1_310), _timed(1_000, 4_200))},
        OPENVPN: {LINK_DOWN: (_timed(1_003, 1_011),), BLACKHOLE: (_timed(1_000, 4_200),)},
    }  # fmt: skip
    results = tuple(attrs.evolve(r, outages=timed[r.key]) if r.key in timed else r for r in report.results)
    return attrs.evolve(report, results=results)


def test_the_plot_data_reads_each_trials_timeline() -> None:
    data = plots.plot_data(_document(_report_with_timelines()))
    blackhole = next(p for p in data.outages if p.fault == BLACKHOLE)
    jvpn_unrecovered = next(t for t in blackhole.trials if t.system == "jvpn-trio" and not t.recovered)
    assert jvpn_unrecovered.timeline is not None
    assert jvpn_unrecovered.timeline.gap_end == pytest.approx(3.0) == jvpn_unrecovered.timeline.window
    assert len(jvpn_unrecovered.timeline.arrivals) == 2 * bench.TIMELINE_CONTEXT_PROBES


def test_the_timelines_figure_draws_every_trial_with_its_gap(tmp_path: Path) -> None:
    drawn = plots.render_all(_document(_report_with_timelines()), tmp_path)
    assert [d.path.name for d in drawn] == [plots.THROUGHPUT_FILE, plots.OUTAGES_FILE, plots.TIMELINES_FILE]
    timelines = drawn[2]
    assert timelines.path.read_bytes().startswith(PNG_SIGNATURE)
    rows = 3 + 3  # link down: two jvpn-trio trials and one OpenVPN; blackhole: the same
    expected_height = (plots.TIMELINE_TOP_IN + plots.TIMELINE_ROW_IN * rows + plots.TIMELINE_PANEL_GAP_IN
                       + plots.TIMELINE_BOTTOM_IN)  # fmt: skip
    assert _png_size(timelines.path) == (round(plots.TIMELINE_WIDTH_IN * plots.DPI), round(expected_height * plots.DPI))
    assert f"{LINK_DOWN}: jvpn-trio, trial 1: gap 2.0 .. 14.0 ms, 100 arrivals" in timelines.items
    assert f"{BLACKHOLE}: OpenVPN, trial 1: gap 0.0 .. 3000.0 ms, 100 arrivals (no recovery)" in timelines.items
    assert len(timelines.items) == rows


def test_a_report_without_timelines_draws_the_other_figures_and_says_so(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Reports saved before the bench kept timelines still replot: no timelines figure, no error."""
    saved = tmp_path / "old.json"
    saved.write_text(json.dumps(_report().to_json()))
    assert _main("--replot", str(saved), "--plots", str(tmp_path / "out")) == 0
    assert not (tmp_path / "out" / plots.TIMELINES_FILE).exists()
    assert f"{plots.TIMELINES_FILE} not drawn" in capsys.readouterr().err
    assert plots.render_timelines(plots.plot_data(_document(_report())), tmp_path / "t.png") is None


def test_a_malformed_timeline_is_one_line() -> None:
    doc = _document(_report_with_timelines())
    doc["systems"][JVPN]["outage"][LINK_DOWN]["runs"][0]["timeline"]["arrivals_s"][3] = "soon"
    with pytest.raises(plots.NotAReport) as info:
        plots.plot_data(doc)
    assert str(info.value) == (
        f"not a jvpn-trio bench report: systems.{JVPN}.outage.{LINK_DOWN}.runs[0].timeline.arrivals_s[3]"
        " is not a finite number"
    )
