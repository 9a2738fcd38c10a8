"""bench.py's method, checked on things whose timings are known, and a smoke run of the tool on the
tiny size."""

import json
import math
import sys

import pytest
import torch

from lab import bench, measure

from tools import run_command


class Clock:
    """A clock that moves only when told: timings known exactly, whatever else the machine is
    doing."""

    def __init__(self):
        self.now = 0.0

    def perf_counter(self):
        return self.now


class SlowLM:
    """A fake language model for generate's prefill and decode steps: a prefill (several positions)
    takes 0.3 s of the clock, a decode step (one position) 20 ms."""

    def __init__(self, clock):
        self.model = torch.nn.Module()
        self.model.embed_tokens = torch.nn.Embedding(10, 4)
        self.calls, self.clock = 0, clock

    def setup_cache(self, batch, length):
        pass

    def clear_cache(self):
        pass

    def lm_head(self, h):
        return torch.zeros(h.shape[0], 10)

    def __call__(self, x, positions, mask, input_pos, kv_len=None):
        self.calls += 1
        self.clock.now += 0.3 if x.shape[1] > 1 else 0.02
        return x


def test_a_time_below_zero_is_too_small_to_time_not_a_rate():
    """A decode time found by subtracting a prefill can fall below zero on a tiny model: no rate, no
    ratio."""
    result = {"ours": measure.spread([0.1, 0.2]), "reference": measure.spread([-0.001, 0.01]),
              "pair_ratios": [-0.01, 0.05]}
    r = measure.row("decode", "tokens/s", result, work=10)
    assert r["too_small_to_time"] and r["ratio"] is None and r["reference"]["median"] is None
    assert r["ours"]["median"] == pytest.approx(
        10 / 0.15
    ) and "too small to time" in measure.format_row(r)


@pytest.fixture
def clock(monkeypatch):
    clock = Clock()
    monkeypatch.setattr(measure, "time", clock)
    return clock


def test_decode_is_timed_by_its_steps_alone(clock):
    lm = SlowLM(clock)
    # the prefill happens here, once
    run = measure.our_decoder(lm, torch.zeros(2, 50, 4), 10, None, "cpu")
    assert lm.calls == 1
    seconds = [run() for _ in range(3)]
    # 3 runs of 10 steps, no prefill again
    assert lm.calls == 31
    # the steps' time, not the prefill's
    assert seconds == pytest.approx([10 * 0.02] * 3)

    def reference():
        clock.now += 0.4
    result = measure.compare(run, reference, "cpu", repeats=3, warmup=0)
    r = measure.row("decode", "tokens/s", result, work=2 * 10)
    # 2 rows x 10 steps / 0.2 s
    assert r["ours"]["median"] == pytest.approx(100)
    assert r["ratio"] == pytest.approx(2) and result["pair_ratios"] == pytest.approx([2] * 3)


def test_turns_alternate_and_the_spread_is_reported(clock):
    order, cost = [], iter([3, 1, 2, 5, 4, 9])

    def ours():
        order.append("a")
        clock.now += next(cost) * 0.01
    result = measure.compare(ours, lambda: order.append("b"), "cpu", repeats=5, warmup=1)
    assert "".join(order) == "ab" * 6
    assert result["ours"]["n"] == result["reference"]["n"] == 5
    assert (result["ours"]["min"], result["ours"]["median"],
            result["ours"]["max"]) == pytest.approx((0.01, 0.04, 0.09))
    r = measure.row("x", "s", result)
    # ours is the slower
    assert r["ratio"] < 1 and r["ratio_range"][0] <= r["ratio"] <= r["ratio_range"][1]


def test_every_section_is_measured_by_its_own_function():
    """--only NAME runs bench_NAME, wherever it is written (bench.py, bench_train.py,
    bench_caption.py, bench_step.py, pipeline.py); never a module of that name (lab.bench_train
    is one, seen from bench.py)."""
    for name in bench.SECTIONS:
        found = bench.section(name)
        assert callable(found) and found.__name__ == f"bench_{name}", (name, found)
    assert set(bench.DEFAULT) < set(bench.SECTIONS)


@pytest.mark.slow
def test_the_tiny_size_runs_and_records_what_it_depends_on(tmp_path):
    """The tool as a user starts it, on the tiny size, with the sections that take seconds there
    (the model's steps against transformers, the sampler, the recipe, the decode step's counts,
    shots): sane numbers (or "too small to time"), the machine and each section's time recorded, no
    section failed."""
    sections = "vision,prefill,decode,roofline,sampler,recipe,steps,shots"
    out = tmp_path / "bench.json"
    r = run_command([sys.executable, "-m", "lab.bench", "--size", "tiny", "--only", sections,
                     "--repeats", "2", "--new-tokens", "4", "--load-gb", "0.02",
                     "--sampler-minutes", "0.2", "--cache", str(tmp_path / "cache"), "--json",
                     str(out)], timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads(out.read_text())
    machine = report["machine"]
    for key in (
        "device",
        "cores",
        "torch_threads",
        "torch",
        "transformers",
        "av",
        "load_before",
        "load_after",
    ):
        assert machine.get(key) is not None, key
    names = [row["name"] for row in report["rows"]]
    assert not [n for n in names if "failed (" in n], names
    assert sum(n.startswith("decode (") and "steps after" in n for n in names) >= 4
    for prefix in ("vision tower", "prefill", "memory bandwidth", "16 frames from",
                   "frames + prefill", "decode step", "shot detection"):
        assert any(n.startswith(prefix) for n in names), prefix
    assert sorted(report["section_seconds"]) == sorted(sections.split(","))
    for row in report["rows"]:
        for side in ("ours", "reference"):
            s = row[side]
            if s and s["median"] is not None:
                assert math.isfinite(s["median"]) and s["min"] <= s["median"] <= s["max"], row
                # a share may be 0 (finished rows, say)
                assert s["median"] > 0 or row["unit"] == "%", row
        assert row["too_small_to_time"] or row["ratio"] is None or 0.01 < row["ratio"] < 100, row
    assert "cache: " in r.stderr and str(tmp_path / "cache") in r.stderr


def test_a_busy_machine_is_said_in_one_line_and_strict_refuses(monkeypatch, capsys):
    import os
    monkeypatch.setattr(os, "getloadavg", lambda: (3.0 * len(os.sched_getaffinity(0)), 0.0, 0.0))
    measure.check_quiet(strict=False)
    line = capsys.readouterr().err.strip()
    assert line.startswith("warning: the machine is busy") and "\n" not in line
    with pytest.raises(SystemExit):
        measure.check_quiet(strict=True)
    capsys.readouterr()
    monkeypatch.setattr(os, "getloadavg", lambda: (0.0, 0.0, 0.0))
    # quiet: it runs, says nothing
    measure.check_quiet(strict=True)
    assert capsys.readouterr().err == ""


def test_the_time_said_at_start_is_the_newest_measured_and_the_default_sections_take_ten_minutes(
    tmp_path,
):
    """The expected time comes from the results/ files (the newest CPU figure for each section), not
    from a table written by hand: every section has one, and the default ones took 8 to 11 minutes
    there."""
    from lab import measure
    took = measure.section_seconds()
    # a new section is measured
    assert set(took) >= set(bench.SECTIONS), set(bench.SECTIONS) - set(took)
    assert 8 <= sum(took[s] for s in bench.DEFAULT) / 60 <= 11 and set(bench.DEFAULT) < set(
        bench.SECTIONS
    )
    said = bench.expected(bench.parse_args(["--device", "cpu"]), list(bench.DEFAULT))
    assert f"about {sum(took[s] for s in bench.DEFAULT) / 60:.0f} minutes" in said
    for name, report in [("bench-cpu-small-2026-01-02.json", {"prefill": 10.0, "decode": 20.0}),
                         ("bench-cpu-small-2026-01-10.json", {"decode": 30.0}),
                         ("bench-pipeline-2026-01-05.json", {"pipeline": 7.0, "decode": 99.0}),
                         ("bench-gpu-small-2026-02-01.json", {"decode": 1.0})]:
        gpu = "gpu" in name
        (tmp_path / name).write_text(
            json.dumps(
                {
                    "size": "small",
                    "section_seconds": report,
                    "machine": {"device": "NVIDIA H100" if gpu else "CPU: x"},
                }
            )
        )
    (tmp_path / "bench-cpu-small-2026-03-01.json").write_text('{"size": "sm')  # cut: left out
    assert measure.section_seconds(str(tmp_path)) == {"prefill": 10.0, "decode": 30.0,
                                                      "pipeline": 7.0}