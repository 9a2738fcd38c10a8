"""lab/gpu_check.py, the first run on a GPU, rehearsed on this CPU at a tiny size: its stages in
their order, the budget that skips what it has no time for, the two-GPU stage on one machine, and
nothing left on disk."""

import json
import os
import subprocess
import sys

import pytest

from lab.gpu_check import STAGES, Stage, plan

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_the_13b_stages_come_first_and_the_whole_check_is_expected_within_ten_minutes_on_one_h100():
    engine = [s for s in STAGES if s.kind == "engine"]
    assert STAGES[: len(engine)] == engine and {s.flags for s in engine} == {
        (),
        ("compile",),
        ("int8",),
        ("int8", "compile"),
    }
    one_gpu = [s for s in STAGES if s.gpus == 1]
    # the budget (600 s) skips the last of them at worst
    assert sum(s.expected_s for s in one_gpu) <= 660
    assert sum(s.expected_s for s in engine) <= 600    # every 13B stage fits the default budget


def test_a_stage_starts_only_if_its_expected_time_fits_what_the_budget_has_left():
    clock = [0.0]
    why = plan([], gpus=1, budget=100, elapsed=lambda: clock[0])
    assert why(Stage("a", 60, "engine")) == ""
    clock[0] = 50
    assert "expected 60 s, 50 s of the budget left" in why(Stage("a", 60, "engine"))
    assert why(Stage("b", 50, "engine")) == ""
    assert "needs 2 GPUs, this machine has 1" in why(Stage("c", 1, "train", gpus=2))
    # a CPU counts as one
    assert plan([], gpus=0, budget=100, elapsed=lambda: 0)(Stage("d", 1, "train")) == ""


@pytest.mark.slow
def test_a_tiny_check_on_the_cpu_runs_its_stages_in_order_skips_by_budget_and_leaves_nothing(
    tmp_path,
):
    work, out = tmp_path / "work", tmp_path / "check.json"
    work.mkdir()
    r = subprocess.run([sys.executable, "-m", "lab.gpu_check", "--size", "tiny", "--device", "cpu",
                        "--budget", "80", "--work", str(work), "--out", str(out)], cwd=ROOT,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    report = json.load(open(out))
    rows = {s["stage"]: s for s in report["stages"]}
    assert [s["stage"] for s in report["stages"]] == [s.name for s in STAGES]
    eager = rows["engine bf16, eager"]
    assert (
        eager["rc"] == 0
        and eager["slots"] == 4
        and eager["tokens"] == 8 * 16
        and eager["graphs"] == 0
    )
    assert eager["tokens_per_s"] > 0 and 0 < eager["prefill_share"] < 1
    # 200 s never fits 80
    assert rows["engine bf16, --compile"]["rc"].startswith("skipped: expected 200 s")
    assert (
        rows["train.py tiny, torchrun 2 GPUs"]["rc"] == "skipped: needs 2 GPUs, this machine has 0"
    )
    ran = [s for s in report["stages"] if s["rc"] == 0]
    assert len(ran) >= 3 and all(s["seconds"] > 0 for s in ran)
    assert list(work.iterdir()) == []                                # the work folder is gone
    table = r.stdout.splitlines()
    assert [line.split("  ")[0].strip() for line in table[:len(STAGES)]] == [s.name for s in STAGES]
