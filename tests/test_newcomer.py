"""A newcomer's first hour: the README's path from a folder of one's own videos and a local
OpenAI-compatible endpoint to captions from one's own fine-tuned model, command by command as the
README gives them (docs/quickstart.md); and what a first try gets wrong: a failed start leaves
nothing behind, a model is named one way everywhere."""

import json
import os
import re
import shutil

import pytest

from labelling.checks import agreement
from plumbing.jsonl import read_rows

from chaos_api import ChaosAPI
from tools import ROOT, free_port, run_tool
from videos import solid_videos

GUIDE = os.path.join(ROOT, "docs", "quickstart.md")


def guide_commands():
    """The shell commands of docs/quickstart.md's code blocks, in order (comments and blanks left
    out)."""
    text = open(GUIDE).read()
    blocks = re.findall(r"```bash\n(.*?)```", text, re.S)
    lines = [line.strip() for block in blocks for line in block.replace("\\\n", " ").splitlines()]
    return [line for line in lines if line and not line.startswith("#")]


TEACHER = "A small square glows in the middle of the frame."


@pytest.mark.slow
def test_the_quickstart_runs_as_written_against_a_local_teacher(ckpt, tmp_path):
    """The guide's commands, with its placeholders filled: my_videos/ (12 videos), the endpoint (a
    fake teacher on localhost), the model to start from (a tiny one in toy_out/stage2's place)."""
    solid_videos(str(tmp_path / "my_videos"), 12, size=(64, 48))
    shutil.copytree(ckpt, tmp_path / "toy_out" / "stage2")
    api = ChaosAPI(lambda body, item: TEACHER, identify=lambda b: "x",
                   script={"x": ["ok"] * 1000}, key=None)   # a local server: any key, no faults
    commands = guide_commands()
    tools = [c.split()[c.split().index("python") + 1] for c in commands]
    assert tools == ["label.py", "label.py", "train.py", "caption.py", "label.py", "train.py",
                     "caption.py"], commands
    try:
        for command in commands:
            words = command.replace("http://localhost:8000/v1", api.url).split()
            env = dict(w.split("=", 1) for w in words if re.fullmatch(r"[A-Z_]+=.*", w))
            args = [w for w in words if not re.fullmatch(r"[A-Z_]+=.*", w)]
            assert args[0] == "python", command
            r = run_tool(args[1], args[2:], env=env, cwd=tmp_path, timeout=600)
            assert r.returncode == 0, (command, r.stderr[-3000:])
    finally:
        api.close()
    labels, clean = (
        read_rows(str(tmp_path / "labels.jsonl")),
        read_rows(str(tmp_path / "clean.jsonl")),
    )
    # a templated answer: kept, not dropped as duplicates
    assert len(labels) == 12 and len(clean) == 12
    captions = read_rows(str(tmp_path / "captions.jsonl"))
    assert len(captions) == 12 and all("caption" in r for r in captions)
    base = run_tool(
        "caption.py",
        ["my_videos/", "--model", "toy_out/stage2", "--out", "base.jsonl"],
        cwd=tmp_path,
    )
    assert base.returncode == 0, base.stderr[-2000:]
    said = {r["name"]: r["caption"] for r in read_rows(str(tmp_path / "base.jsonl"))}
    after = {r["name"]: r["caption"] for r in captions}
    near = [agreement(after[k], TEACHER) - agreement(said[k], TEACHER) for k in after]
    # the fine-tune moved them to the teacher's words
    assert sum(d > 0 for d in near) >= 9, (said, after)
    model = tmp_path / "runs" / "mine" / "model"
    assert json.load(open(model / "prompt.json"))["template"] == "vicuna"
    # the share the student disputes, again
    rechecked = read_rows(str(tmp_path / "rechecked.jsonl"))
    assert len(rechecked) == 12 and 1 <= sum(r["rechecked"] for r in rechecked) <= 4
    assert all(len(captions) == 12 for captions in [read_rows(str(tmp_path / "captions2.jsonl"))])


@pytest.mark.slow
def test_a_failed_start_leaves_nothing_behind(ckpt, tmp_path, monkeypatch):
    """Offline with the default model: no captions.jsonl, no cache folder. A model folder without a
    tokenizer.model: no output file either."""
    video = tmp_path / "v.mp4"
    solid_videos(str(tmp_path / "v"), 1)
    shutil.copy(tmp_path / "v" / "v00.mp4", video)
    cache = tmp_path / "cache"
    r = run_tool("caption.py", [video], cwd=tmp_path,
                 env={"HF_ENDPOINT": f"http://127.0.0.1:{free_port()}",
                      "PLLAVA_CACHE": str(cache)}, timeout=300)
    assert r.returncode == 1 and r.stderr.strip().splitlines()[-1].startswith("error: ")
    assert "ermu2001/pllava-7b" in r.stderr and not (tmp_path / "captions.jsonl").exists()
    assert not cache.exists() or not any(cache.rglob("*")), list(cache.rglob("*"))
    broken = tmp_path / "model"
    shutil.copytree(ckpt, broken)
    os.remove(broken / "tokenizer.model")
    r = run_tool(
        "caption.py", [video, "--model", broken, "--out", tmp_path / "out.jsonl"], timeout=300
    )
    assert (
        r.returncode == 1
        and "tokenizer.model" in r.stderr
        and not (tmp_path / "out.jsonl").exists()
    )
    assert not list(tmp_path.glob("out.jsonl*"))


def test_every_release_is_the_same_model_by_its_name_and_by_its_hub_id():
    """Every tool reads a model's sizes through weights.model_config: a release's short name and
    its hub id give one config, with no download; a name that is neither says what it takes."""
    from weights import RELEASES, ModelFolderError, model_config
    for short, hub_id in RELEASES.items():
        assert model_config(short) == model_config(hub_id), short
    with pytest.raises(ModelFolderError, match="not a model folder nor a release"):
        model_config("someone/pllava-7b")


@pytest.mark.slow
def test_a_model_is_named_one_way_everywhere(tmp_path):
    """The default release by its hub id (its short name: above): both plans read it without a
    download, and a refusal never suggests the flag already given."""
    model = "ermu2001/pllava-7b"
    r = run_tool("caption.py",
                 [tmp_path, "--model", model, "--dry-run", "--card-gb", "24", "--quantize", "int8",
                  "--batch-size", "12"])   # 26.6 GB estimated
    assert r.returncode == 1 and "does not fit" in r.stderr and "--quantize int8" not in r.stderr, (
        r.stderr
    )
    r = run_tool("train.py", ["--model", model, "--dry-run", "--gpus", "8", "--batch-size", "2"])
    assert r.returncode == 0 and "on 8 GPU(s)" in r.stdout, r.stderr


@pytest.mark.slow
def test_the_stand_in_teacher_starts_with_one_command_and_labels_what_the_frames_show(tmp_path):
    """`python -m lab.standin_teacher` as the quickstart starts it; label.py against it, frames sent
    as images and as Qwen's video part: a red square moving right, then down, on a dark background
    is labelled so."""
    import subprocess
    import sys

    import numpy as np
    from lab.synthetic import write_video

    def frames(colour, n=48):
        for i in range(n):
            img = np.full((96, 128, 3), 20, np.uint8)
            x, y = (10 + 4 * i, 10) if i < n // 2 else (10 + 4 * (n // 2), 10 + 2 * (i - n // 2))
            img[y:y + 16, x:x + 16] = colour
            yield img
    (tmp_path / "vids").mkdir()
    write_video(str(tmp_path / "vids" / "red.mp4"), frames((220, 40, 40)))
    write_video(str(tmp_path / "vids" / "blue.mp4"), frames((40, 80, 220)))
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "lab.standin_teacher", "--port", str(port)],
                              cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert "stand-in teacher" in server.stdout.readline()
        for form in ("images", "video"):
            out = tmp_path / f"labels-{form}.jsonl"
            r = run_tool("label.py",
                         [tmp_path / "vids", "--api-base", f"http://127.0.0.1:{port}/v1",
                          "--model", "any", "--frames-as", form, "--out", out],
                         env={"DASHSCOPE_API_KEY": "EMPTY"})
            assert r.returncode == 0, r.stderr[-2000:]
            labels = {os.path.basename(row["video"]): row["caption"] for row in read_rows(str(out))}
            assert labels == {
                "red.mp4": "A red shape at the top left moves right then down on a dark "
                "background.",
                "blue.mp4": "A blue shape at the top left moves right then down on a dark "
                "background.",
            }
    finally:
        server.terminate()
        server.wait(timeout=10)
