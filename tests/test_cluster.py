"""Many nodes, one result: three "nodes" that see one share at different paths (a symlink, a deeper
symlink, a hard-linked copy) and keep their list, labels and student files at different paths of
their own. Every tool shards and resumes by the video's name (plumbing/sources.py): every item in
exactly one shard, and a rerun from another mount adds nothing."""

import collections
import json
import os
import shutil
import subprocess
import sys

import pytest

from plumbing.jsonl import read_rows

from fake_api import KEY, FakeAPI, label_server
from helpers import tiny_checkpoint
from tools import ROOT, free_port, run_command, run_tool
from videos import solid_videos

N = 24
ENV = {"DASHSCOPE_API_KEY": KEY, "OPENAI_API_KEY": KEY}


@pytest.fixture
def nodes(tmp_path):
    """(the share's three mount points, the videos' colours): node a mounts it at a/mnt, node b at
    b/data/x/share; node c sees the videos as a hard-linked copy (c/nfs/videos: other paths, other
    folders' inodes) and the share's out/ through a symlink. Outputs go to out/ on every node."""
    share = tmp_path / "share"
    _, colours = solid_videos(str(share / "videos"), N, n_frames=6, size=(48, 32))
    (share / "out").mkdir()
    (tmp_path / "a").mkdir()
    os.symlink(share, tmp_path / "a" / "mnt")
    (tmp_path / "b" / "data" / "x").mkdir(parents=True)
    os.symlink(share, tmp_path / "b" / "data" / "x" / "share")
    shutil.copytree(share / "videos", tmp_path / "c" / "nfs" / "videos", copy_function=os.link)
    os.symlink(share / "out", tmp_path / "c" / "nfs" / "out")
    return [tmp_path / "a" / "mnt", tmp_path / "b" / "data" / "x" / "share",
            tmp_path / "c" / "nfs"], colours


def keep_at(tmp_path, node, name, text):
    """A node's own copy of a shared file (a list, labels), at a path of that node's own."""
    path = tmp_path / f"{node}-home" / "work" / ("deeper/" * node) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def once_each(files):
    """The names in the rows of these files, with how many rows each has."""
    return collections.Counter(r["name"] for f in files for r in read_rows(str(f)))


def label(args):
    r = run_tool("label.py", args, env=ENV)
    assert r.returncode == 0, r.stderr[-2000:]
    return r


@pytest.mark.slow
def test_three_nodes_label_a_folder_each_video_once_and_a_rerun_from_another_mount_adds_nothing(
        tmp_path, nodes):
    mounts, colours = nodes
    api = label_server(colours)
    try:
        for k, mount in enumerate(mounts):
            label([mount / "videos", "--out", mount / "out" / f"labels.{k}.jsonl", "--shard",
                   f"{k}/3", "--api-base", api.url])
        calls = len(api.log)
        # each shard requeued on another node
        again = [label([mounts[(k + 1) % 3] / "videos",
                        "--out", mounts[(k + 1) % 3] / "out" / f"labels.{k}.jsonl",
                        "--shard", f"{k}/3", "--api-base", api.url]) for k in range(3)]
    finally:
        api.close()
    counts = once_each(mounts[0] / "out" / f"labels.{k}.jsonl" for k in range(3))
    assert len(counts) == N and set(counts.values()) == {1} and calls == N
    assert len(api.log) == N and all("labelled 0 " in r.stderr for r in again)
    names = {r["name"] for r in read_rows(str(mounts[0] / "out" / "labels.1.jsonl"))}
    assert names < {f"v{i:02d}.mp4" for i in range(N)}                       # names, not paths


@pytest.mark.slow
def test_three_nodes_label_a_list_of_absolute_paths_kept_at_different_paths(tmp_path, nodes):
    mounts, colours = nodes
    listing = "".join(f"{tmp_path}/share/videos/v{i:02d}.mp4\n" for i in range(N))
    api = label_server(colours)
    try:
        outs = [tmp_path / f"list.{k}.jsonl" for k in range(3)]
        for k in range(3):
            label([keep_at(tmp_path, k, "videos.txt", listing), "--out", outs[k], "--shard",
                   f"{k}/3", "--api-base", api.url])
    finally:
        api.close()
    counts = once_each(outs)
    assert len(counts) == N and set(counts.values()) == {1} and len(api.log) == N


@pytest.mark.slow
def test_three_nodes_recheck_and_verify_labels_kept_at_different_paths(tmp_path, nodes):
    """Labels from before names (absolute paths of one node's mount, no "name"), and labels that
    carry names, read by --video-root on each node's own mount."""
    mounts, colours = nodes
    old = "".join(json.dumps({"video": f"{mounts[0]}/videos/v{i:02d}.mp4",
                              "caption": f"Video {i}: a square.",
                              "frames": 4}) + "\n" for i in range(N))
    student = "".join(json.dumps({"video": f"{mounts[1]}/videos/v{i:02d}.mp4",
                                  "name": f"v{i:02d}.mp4",
                                  "caption": "a square" if i % 2 else f"Video {i}: a square."})
                      + "\n" for i in range(N))
    named = "".join(json.dumps({"video": f"/gone/videos/v{i:02d}.mp4", "name": f"v{i:02d}.mp4",
                                "caption": f"Video {i}: a square.",
                                "frames": 4}) + "\n" for i in range(N))
    api = label_server(colours)
    api.answer = lambda body, item: (json.dumps({"supported": [True]})
                                     if "numbered" in json.dumps(body)
                                     else f"Video {item}: a coloured square.")
    try:
        verified, rechecked = [tmp_path / f"verified.{k}.jsonl" for k in range(3)], []
        for k in range(3):
            label(["verify", keep_at(tmp_path, k, "old.jsonl", old), "--out", verified[k],
                   "--shard", f"{k}/3", "--api-base", api.url])
        verify_calls = len(api.log)
        for k in range(3):
            rechecked.append(tmp_path / f"rechecked.{k}.jsonl")
            label(["recheck", keep_at(tmp_path, k, "named.jsonl", named), "--student",
                   keep_at(tmp_path, k, "student.jsonl", student), "--out", rechecked[k],
                   "--shard", f"{k}/3", "--video-root", mounts[k] / "videos",
                   "--api-base", api.url])
    finally:
        api.close()
    for outs in (verified, rechecked):
        counts = once_each(outs)
        assert len(counts) == N and set(counts.values()) == {1}, counts
    assert verify_calls == N
    asked = [r for f in rechecked for r in read_rows(str(f)) if r.get("rechecked")]
    # the 30% asked, once each
    assert len(asked) == round(0.3 * N) == len(api.log) - N
    assert all(r["caption"].startswith("Video ") and r["video"].startswith(str(tmp_path))
               for r in asked)


@pytest.mark.slow
def test_three_nodes_caption_as_three_ranks_and_judge_pairs_rows_by_name(tmp_path, nodes):
    mounts, colours = nodes
    model = tiny_checkpoint(str(tmp_path / "model"))
    port = free_port()
    procs = []
    # three "nodes" of one torchrun job, each with its own mount
    for k, mount in enumerate(mounts):
        env = {**os.environ, "RANK": str(k), "WORLD_SIZE": "3", "LOCAL_RANK": "0",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        procs.append(subprocess.Popen([sys.executable, os.path.join(ROOT, "caption.py"),
                                       str(mount / "videos"), "--model", model, "--out",
                                       str(mount / "out" / "captions.jsonl"), "--workers", "1",
                                       "--max-new-tokens", "4"], env=env,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                      start_new_session=True))
    errs = [p.communicate(timeout=300)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], errs[0][-2000:]
    counts = once_each([mounts[0] / "out" / "captions.jsonl"])
    assert len(counts) == N and set(counts.values()) == {1}
    rows = read_rows(str(mounts[0] / "out" / "captions.jsonl"))
    # each node wrote its own paths
    assert {r["video"].split("/videos/")[0] for r in rows} == {str(m) for m in mounts}
    again = run_tool("caption.py", [mounts[2] / "videos", "--model", model, "--out",
                                    mounts[1] / "out" / "captions.jsonl",
                                    "--workers", "1", "--max-new-tokens", "4"])
    assert again.returncode == 0 and f"{N} already done" in again.stderr, again.stderr[-1000:]
    assert len(read_rows(str(mounts[0] / "out" / "captions.jsonl"))) == N

    gt = keep_at(tmp_path, 0, "gt.jsonl",
                 "".join(json.dumps({"video": f"/elsewhere/v{i:02d}.mp4", "name": f"v{i:02d}.mp4",
                                     "caption": f"Video {i}."}) + "\n" for i in range(N)))
    api = FakeAPI(lambda body: 0,
                  lambda body, item: json.dumps({"score": 3, "correct": True, "reason": "ok"}))
    try:
        first = run_tool("judge.py",
                         ["--gt", gt, "--pred", mounts[1] / "out" / "captions.jsonl", "--out",
                          mounts[1] / "out" / "report", "--api-base", api.url], env=ENV)
        calls = len(api.log)
        second = run_tool("judge.py",
                          ["--gt", keep_at(tmp_path, 2, "gt.jsonl", gt.read_text()), "--pred",
                           mounts[2] / "out" / "captions.jsonl", "--out",
                           mounts[2] / "out" / "report", "--api-base", api.url], env=ENV)
    finally:
        api.close()
    assert first.returncode == 0 and second.returncode == 0, first.stderr[-1000:]
    summary = json.load(open(mounts[0] / "out" / "report" / "summary.json"))
    assert summary["videos"] == N and summary["dropped"] == 0
    assert 0 < calls <= N and len(api.log) == calls


# ------------------------------------------------------------------ training on a cluster

# world: the tiny model's fixture
from test_train import run, train_args, weights, world  # noqa: E402,F401


def rank_process(mark, rank):
    """The pid of train.py's rank `rank` among the processes whose environment holds `mark`."""
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            environ = open(f"/proc/{pid}/environ", "rb").read().split(b"\0")
            cmdline = open(f"/proc/{pid}/cmdline", "rb").read()
        except OSError:
            continue
        if (mark.encode() in environ and f"RANK={rank}".encode() in environ
                and b"train.py" in cmdline):
            return int(pid)
    return None


@pytest.mark.slow
def test_a_rank_killed_mid_run_restarts_and_ends_equal_to_an_uninterrupted_run(world, tmp_path):
    import signal
    import time
    import torch
    common = ["--max-steps", "12", "--batch-size", "1", "--lr", "1e-2", "--lora-r", "4",
              "--save-every", "2"]
    run(train_args(world, tmp_path / "straight", "--export", tmp_path / "e_straight", *common), 2)
    out, mark = tmp_path / "killed", f"CLUSTER_TEST_MARK={os.getpid()}-{time.time_ns()}"
    # the c10d rendezvous, as docs/slurm/train.sbatch: each restart gets a store of its own (the
    # static one keeps its store, where a restarted rank can read the address of the rank that died)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--max-restarts=1",
           "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{free_port()}",
           os.path.join(ROOT, "train.py"),
           *map(str, train_args(world, out, "--export", tmp_path / "e_restarted", *common))]
    proc = run_command(cmd, env=dict([mark.split("=")]), wait=False, timeout=600)
    deadline = time.time() + 300
    while time.time() < deadline and not (out / "checkpoints" / "step_00000004").exists():
        time.sleep(0.05)
    victim = rank_process(mark, 1)
    assert victim and not (out / "checkpoints" / "step_00000012").exists()
    os.kill(victim, signal.SIGKILL)                                          # rank 1 lost mid-run
    stdout, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 0, stderr[-3000:]
    assert "torchrun restart 1: resuming from the newest checkpoint" in stderr
    steps = [m["step"] for m in read_rows(str(out / "metrics.jsonl")) if "loss" in m]
    # each step logged once
    assert steps == list(range(1, 13))
    a, b = weights(tmp_path / "e_straight"), weights(tmp_path / "e_restarted")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), (k, (a[k] - b[k]).abs().max())


@pytest.mark.slow
def test_a_resume_keeps_its_sample_list_and_may_change_world_size_but_not_global_batch(world,
                                                                                      tmp_path):
    import torch
    data = tmp_path / "train.jsonl"
    shutil.copy(world["data"], data)
    common = ["--max-steps", "4", "--lr", "1e-2", "--lora-r", "4", "--save-every", "2",
              "--lora-dropout", "0"]
    args = [str(data) if a == world["data"] else a
            for a in train_args(world, tmp_path / "run", *common)]
    run(args + ["--batch-size", "1", "--export", str(tmp_path / "e_straight")], 2)
    # as if lost after step 2
    shutil.rmtree(tmp_path / "run" / "checkpoints" / "step_00000004")
    # the data changed meanwhile
    with open(data, "a") as f:
        f.write(json.dumps({"video": "v0.mp4", "caption": "a row added later"}) + "\n")
    refused = run_tool("train.py", args + ["--batch-size", "1", "--resume"])
    assert refused.returncode == 1 and "global batch of 2" in refused.stderr
    assert refused.stderr.strip().splitlines()[-1].startswith("error: ")
    resumed = run(args + ["--batch-size", "2", "--resume", "--export",
                          str(tmp_path / "e_resumed")], 1)
    assert "resuming with the" in resumed.stderr and "steps 2..4" in resumed.stderr
    a, b = weights(tmp_path / "e_straight"), weights(tmp_path / "e_resumed")
    for k in a:
        assert torch.allclose(a[k], b[k], rtol=0, atol=1e-5), k


@pytest.mark.slow
def test_the_slurm_scripts_run_as_written(world, tmp_path, nodes):
    """docs/slurm/*.sbatch with the Slurm variables they read set by hand, `srun` running its
    command once and `scontrol` naming this machine; a requeue (SLURM_RESTART_COUNT) of the training
    job."""
    mounts, colours = nodes
    bin_ = tmp_path / "bin"
    bin_.mkdir()
    (bin_ / "srun").write_text('#!/bin/sh\nexec "$@"\n')
    (bin_ / "scontrol").write_text("#!/bin/sh\necho 127.0.0.1\n")
    for tool in ("srun", "scontrol"):
        os.chmod(bin_ / tool, 0o755)
    slurm = {"PATH": f"{bin_}:{os.path.dirname(sys.executable)}:{os.environ['PATH']}",
             "SLURM_SUBMIT_DIR": ROOT, "SLURM_JOB_ID": "77", "SLURM_JOB_NODELIST": "node[01-02]",
             "SLURM_NNODES": "1", "SLURM_CPUS_PER_TASK": "1", "GPUS_PER_NODE": "2",
             "PORT": str(free_port()), "SLURM_ARRAY_TASK_COUNT": "3", **ENV}

    def sbatch(script, **env):
        r = run_command(["bash", os.path.join(ROOT, "docs", "slurm", script)],
                        env={**slurm, **env}, timeout=600)
        assert r.returncode == 0, r.stderr[-3000:]
        return r

    api = label_server(colours)
    try:
        for k in range(3):
            sbatch("label.sbatch", SLURM_ARRAY_TASK_ID=str(k), VIDEOS=str(mounts[k] / "videos"),
                   OUT=str(mounts[k] / "out" / "labels"),
                   LABEL_FLAGS=f"--api-base {api.url} --concurrency 2")
    finally:
        api.close()
    counts = once_each((mounts[0] / "out" / "labels").iterdir())
    assert len(counts) == N and set(counts.values()) == {1} and len(api.log) == N

    model = tiny_checkpoint(str(tmp_path / "model"))
    sbatch("caption.sbatch", VIDEOS=str(mounts[1] / "videos"), MODEL=model,
           OUT=str(mounts[1] / "out" / "c.jsonl"), CAPTION_FLAGS="--workers 1 --max-new-tokens 4")
    counts = once_each([mounts[0] / "out" / "c.jsonl"])
    assert len(counts) == N and set(counts.values()) == {1}

    flags = " ".join(str(a) for a in train_args(world, "X", "--max-steps", "2", "--batch-size", "1",
                                                "--lora-r", "4")
                     if a not in ("--data", world["data"], "--out", "X"))
    train = dict(DATA=world["data"], OUT=str(tmp_path / "run"), TRAIN_FLAGS=flags)
    sbatch("train.sbatch", **train)
    requeued = sbatch("train.sbatch", SLURM_RESTART_COUNT="1", **train)
    assert "Slurm requeue 1: resuming from the newest checkpoint" in requeued.stderr
    assert os.path.exists(tmp_path / "run" / "model" / "config.json")
