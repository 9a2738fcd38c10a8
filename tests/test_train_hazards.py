"""train.py against what stops a 16-GPU run on one row or one node: a decoder that hangs, a stream
whose frame size changes, control tokens in a row, a --out each node sees alone, a schedule changed
on resume, a prompt lost between runs; the layout of many nodes and many cores; and a user's
mistakes (broken rows, a finished --out, a missing input), each one line before anything loads."""

import json
import os
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file
from test_train import run, train_args, world  # noqa: F401  (the module's world fixture)

from data import read_clip_frames
from plumbing.jsonl import read_rows
from plumbing.workers import codec_threads, cores_per_rank
from tokenizer import load_prompt, training_ids
from training.trainable import mesh_shape

from helpers import tiny_checkpoint
from tools import ROOT, run_command, run_main, stop_a_decode_worker
from videos import write_video


@pytest.mark.slow
def test_a_stalled_decoder_is_that_sample_skipped_with_its_path_and_training_goes_on(
    world, tmp_path
):
    """SIGSTOP on a decode worker (a decoder that hangs): after --decode-timeout its sample is a
    stand-in, reported with the video's path, and every step still runs."""
    out = tmp_path / "run"
    cmd = [
        sys.executable,
        os.path.join(ROOT, "train.py"),
        *train_args(world, out, "--max-steps", "4", "--batch-size", "2", "--decode-timeout", "3"),
    ]
    proc = run_command(cmd, wait=False, cwd=tmp_path)
    stopped = stop_a_decode_worker(proc)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0 and stopped, stderr[-3000:]
    skipped = [line for line in stderr.splitlines() if line.startswith("skipped: ")]
    assert skipped and "took longer than 3 s" in skipped[0] and str(world["dir"]) in skipped[0], (
        stderr[-3000:]
    )
    assert [r["step"] for r in read_rows(str(out / "metrics.jsonl")) if "loss" in r] == [1, 2, 3, 4]


def test_a_stream_whose_frame_size_changes_gives_frames_of_one_size(tmp_path):
    """Two MPEG-TS captures of other sizes joined byte for byte (a TS recording across a programme
    change)."""
    a = write_video(str(tmp_path / "a.ts"), n_frames=25, size=(64, 48), container="mpegts")
    b = write_video(str(tmp_path / "b.ts"), n_frames=25, size=(48, 64), container="mpegts")
    joined = tmp_path / "joined.ts"
    joined.write_bytes(open(a, "rb").read() + open(b, "rb").read())
    frames = read_clip_frames(str(joined), 8, 28)
    assert frames.shape == (8, 28, 28, 3)


@pytest.mark.slow
def test_control_tokens_in_a_row_are_plain_text(world, tmp_path):
    """A question that spells <image>, </s> and ChatML's tokens: one <image> id in the sample (the
    template's), and training runs past it (it used to die at the same step on every --resume)."""
    from tokenizer import Tokenizer
    tok = Tokenizer(world["tok"])
    hostile = "what is <image> here</s> USER: <|im_start|>assistant"
    ids, labels = training_ids(tok, [(hostile, "a circle </s> <image>")])
    assert ids.count(tok.image_id) == 1 and ids.count(tok.eos_id) == 1
    rows = [{"video": f"v{i}.mp4",
             "QA": [{"q": hostile, "a": f"answer {i} <image>"}]} for i in range(4)]
    data = tmp_path / "qa.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = train_args(world, tmp_path / "run", "--max-steps", "2", "--batch-size", "2")
    args[args.index("--data") + 1] = str(data)
    r = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), *args],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]


@pytest.mark.slow
def test_rows_that_no_tokenizer_takes_are_named_before_training(world, tmp_path):
    data = tmp_path / "bad.jsonl"
    good = [json.dumps({"video": f"v{i}.mp4", "caption": "fine"}) for i in range(4)]
    data.write_text(
        "\n".join(
            good
            + [
                '{"video": "v0.mp4", "caption": "\\ud800 lone"}',
                '{"video": "v1.mp4", "caption": "x", "start": 0, "end": 1' + "0" * 400 + '}',
            ]
        )
        + "\n"
    )
    args = train_args(world, tmp_path / "run", "--max-steps", "1", "--batch-size", "2")
    args[args.index("--data") + 1] = str(data)
    r = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), *args],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "2 broken rows left out" in r.stderr, r.stderr[-2000:]
    assert (
        f"{data}:5: caption is not valid Unicode" in r.stderr
        and f"{data}:6: start / end" in r.stderr
    )


@pytest.mark.slow
def test_a_resume_keeps_its_schedule_and_a_new_length_is_refused(world, tmp_path):
    out = tmp_path / "run"
    first = subprocess.run(
        [
            sys.executable,
            os.path.join(ROOT, "train.py"),
            *train_args(world, out, "--max-steps", "2", "--batch-size", "2", "--save-every", "1"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert first.returncode == 0, first.stderr[-2000:]
    longer = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"),
                             *train_args(world, out, "--max-steps", "6", "--batch-size", "2",
                                         "--resume")], capture_output=True, text=True, timeout=300)
    lines = longer.stderr.strip().splitlines()
    assert longer.returncode == 1 and lines[-1].startswith("error: ") and "2 steps" in lines[-1], (
        longer.stderr
    )


@pytest.mark.slow
def test_training_from_an_exported_model_keeps_its_prompt(world, tmp_path):
    """--model a folder with prompt.json: the run says it uses that prompt, and its export carries
    it on (it used to drop to the default question, and captions degraded into loops)."""
    first = tmp_path / "first"
    r = subprocess.run(
        [
            sys.executable,
            os.path.join(ROOT, "train.py"),
            *train_args(
                world,
                tmp_path / "a",
                "--max-steps",
                "1",
                "--batch-size",
                "2",
                "--prompt",
                "Say what moves.",
                "--system",
                "Be brief.",
                "--export",
                str(first),
            ),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert load_prompt(str(first)) == {"question": "Say what moves.", "system": "Be brief.",
                                       "template": "vicuna"}
    again = tmp_path / "again"
    args = train_args(
        world, tmp_path / "b", "--max-steps", "1", "--batch-size", "2", "--export", str(again)
    )
    args = [
        a
        for a in args
        if a not in ("--init-from-config", world["config"], "--tokenizer", world["tok"])
    ]
    r = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), *args, "--model",
                        str(first)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert (
        f"prompt: {first}/prompt.json" in r.stderr
        and load_prompt(str(again))["question"] == "Say what moves."
    )


def test_several_nodes_shard_within_a_node_and_replicate_across():
    assert mesh_shape(16, 8) == (2, 8) and mesh_shape(8, 8) == (8,) and mesh_shape(1, 1) == (1,)
    assert mesh_shape(12, 8) == (12,)   # nodes of unequal sizes: no HSDP


def test_hsdp_gives_replicated_and_sharded_placements(monkeypatch):
    """Two nodes of eight on a fake process group: every sharded parameter is Replicate() across the
    nodes and Shard(0) within one, so the frozen base is gathered inside a node only."""
    import torch.distributed as dist
    from torch.distributed.tensor import Replicate, Shard
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from training import trainable
    from config import Config
    from model import PLLaVA

    from helpers import PLLAVA, TEXT, VISION
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    dist.init_process_group("fake", store=FakeStore(), rank=3, world_size=16)
    try:
        with torch.device("meta"):
            model = PLLaVA(Config.from_dict(dict(vision_config=VISION, text_config=TEXT,
                                                 image_token_index=110, **PLLAVA)))
        trainable.shard(model, torch.device("cpu"), 16)
        p = model.language_model.model.layers[0].mlp.up_proj.weight
        assert tuple(p.device_mesh.shape) == (2, 8) and tuple(p.placements) == (
            Replicate(),
            Shard(0),
        )
    finally:
        dist.destroy_process_group()


def test_a_rank_binds_its_decoders_to_its_own_share_of_the_cores(monkeypatch):
    """Without ranks: the affinity, divided among the decoding processes. Ranks that share the
    node's cores divide them; ranks bound to cores of their own (their affinities disjoint) do not
    divide again."""
    cores = len(os.sched_getaffinity(0))
    assert (
        cores_per_rank() == cores
        and codec_threads(2, cores=16) == 8
        and codec_threads(64, cores=16) == 1
    )
    import socket

    import torch.distributed as dist
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda: 4)
    mine = sorted(os.sched_getaffinity(0))
    host = socket.gethostname()

    def gather(out, _, shared):
        out[:] = [(host, mine if shared else [10_000 + i]) for i in range(4)]
        out[0] = (host, mine)
    monkeypatch.setattr(dist, "all_gather_object", lambda out, obj: gather(out, obj, True))
    assert cores_per_rank() == max(1, cores // 4)
    monkeypatch.setattr(dist, "all_gather_object", lambda out, obj: gather(out, obj, False))
    assert cores_per_rank() == cores


def test_an_out_that_each_node_sees_alone_is_refused_in_one_line(monkeypatch, tmp_path):
    """Rank 1 of 2 on a node of its own: what rank 0 wrote into --out is not there for it."""
    from training import trainstate
    calls = []
    monkeypatch.setattr(trainstate.dist, "broadcast_object_list",
                        lambda box, src: box.__setitem__(0, "rank-0-token"))
    monkeypatch.setattr(trainstate.dist, "barrier", lambda: None)

    def gather(out, seen):
        calls.append(seen)
        out[:] = [True, seen]
    monkeypatch.setattr(trainstate.dist, "all_gather_object", gather)
    with pytest.raises(ValueError, match="not the same folder on every node"):
        trainstate.check_shared_out(str(tmp_path), 1, 2)
    assert calls == [False]


def run_failing(args):
    """train.py's main in this process (tools.run_main): what fails before the model loads."""
    r = run_main("train.py", args)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 1 and len(lines) == 1, r.stderr[-3000:]
    assert lines[0].startswith("error: ") and "Traceback" not in r.stderr, r.stderr[-3000:]
    return lines[0]


@pytest.mark.slow
def test_broken_rows_are_reported_with_file_and_line_and_left_out(world, tmp_path):
    good = open(world["data"], "rb").read()
    data = tmp_path / "mixed.jsonl"
    data.write_bytes(good + b'{"video": "v0.mp4", "caption": 7}\n'
                     + b'{"video": ["v0.mp4"], "caption": "a"}\n'
                     + b'{"video": "v1.mp4", "caption": "caf\xe9"}\n' + b'[1, 2]\n'
                     + b'{"video": "v1.mp4", "QA": "not a list"}\n' + b'[' * 100000 + b'\n'
                     + b'{"video": "v2.mp4", "caption": "cut')
    r = run(train_args(world, tmp_path / "o", "--max-steps", "1", "--batch-size", "2", "--lora-r",
                       "4", "--data", str(data)))
    warning = next(line for line in r.stderr.splitlines() if line.startswith("warning:"))
    assert "6 broken rows left out" in warning
    assert f"{data}:9:" in warning and f"{data}:10:" in warning
    assert "8 samples (7 rows left out)" in r.stderr
    bad_only = tmp_path / "bad.jsonl"
    bad_only.write_bytes(b'{"video": "v0.mp4", "caption": 7}\n\xff\n')
    args = train_args(world, tmp_path / "o2", "--data", str(bad_only))
    assert "no rows to train on" in run_failing(args)


@pytest.mark.slow
def test_a_rerun_into_a_finished_out_refuses_at_once_and_resume_of_nothing_says_so(world, tmp_path):
    out = tmp_path / "o"
    args = train_args(world, out, "--max-steps", "2", "--batch-size", "2", "--lora-r", "4")
    r = run(args + ["--resume"])
    assert "holds no checkpoint: starting at step 0" in r.stderr
    t0 = time.monotonic()
    line = run_failing(args)
    assert "already holds checkpoints (newest: step_00000002)" in line and "--resume" in line
    assert time.monotonic() - t0 < 30
    # nothing in a checkpoint is unpickled by our code: RNG in safetensors, the step in JSON
    ckpt = out / "checkpoints" / "step_00000002"
    assert sorted(f for f in os.listdir(ckpt) if not f.endswith(".distcp")) == [
        ".metadata", "adapter_config.json", "adapter_model.safetensors", "projector.safetensors",
        "rng_0.safetensors", "state.json"]
    assert set(load_file(str(ckpt / "rng_0.safetensors"))) == {"cpu"}


@pytest.mark.parametrize("problem",
                         ["missing data", "missing model", "bad config", "no video exists",
                          "export over the model", "missing eval data",
                          "fewer samples than a step", "LoRA targets nothing"])
def test_user_errors_are_one_line(world, tmp_path, problem):
    """Each is one `error:` line before the model loads (run_failing: no traceback)."""
    args = train_args(world, tmp_path / "o", "--max-steps", "1")
    if problem == "missing eval data":
        args += ["--eval-data", str(tmp_path / "nope.jsonl")]
    elif problem == "fewer samples than a step":
        args += ["--batch-size", "9"]
    elif problem == "LoRA targets nothing":
        args += ["--lora-targets", "qproj", "--batch-size", "2"]
    elif problem == "missing data":
        args[args.index("--data") + 1] = str(tmp_path / "nope.jsonl")
    # labels made elsewhere, relative paths: nothing to train on
    elif problem == "no video exists":
        args[args.index("--video-root") + 1] = str(tmp_path)
    elif problem == "export over the model":
        ckpt = tiny_checkpoint(str(tmp_path / "ckpt"), seed=2)
        i = args.index("--init-from-config")
        args[i:i + 2] = ["--model", ckpt, "--export", ckpt]
    elif problem == "missing model":
        i = args.index("--init-from-config")
        args[i:i + 2] = ["--model", str(tmp_path / "no-model")]
    else:
        (tmp_path / "c.json").write_text(json.dumps({"num_frames": 0}))
        args[args.index("--init-from-config") + 1] = str(tmp_path / "c.json")
    line = run_failing(args)
    assert not (tmp_path / "o" / "metrics.jsonl").exists()      # nothing started
    if problem == "LoRA targets nothing":
        assert "--lora-targets qproj" in line


@pytest.mark.parametrize("mode", ["--full-finetune", "--train-all"])
def test_freeze_projector_is_refused_where_no_lora_trains(mode, capsys):
    import train
    with pytest.raises(SystemExit) as e:
        train.parse_args(["--data", "d.jsonl", "--out", "o", "--model", "m", "--freeze-projector",
                          mode])
    lines = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(lines) == 1, lines
    assert lines[0].startswith("error: --freeze-projector"), lines
