"""A newcomer's first hour, timed: a fresh clone and a fresh virtual environment, the README's
install, `python toy.py`, then docs/quickstart.md's commands against the stand-in teacher on 24 of
the toy's held-out videos, with the captions before and after the fine-tune compared to the
teacher's labels.

    python -m lab.newcomer [--busy 2] [--out results/newcomer-DATE.json]

--busy N starts N busy-loop processes beside it (a minute before the toy, so the load has risen, as
on a shared machine) and stops them at the end. Every command's seconds and exit code are recorded,
the toy's check lines, and per caption file: the share the same as the base model's, that loop, that
were cut at the token limit, in the teacher's wording ("shape" and "background"), and the mean
word-pair agreement with the teacher's label (checks.agreement).
"""

import argparse
import datetime
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time

from labelling.checks import agreement
from lab.measure import ROOT, cpu_model
from plumbing.jsonl import read_rows


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def timed(cmd, cwd, env, log, timeout=3600):
    start = time.monotonic()
    with open(log, "a") as f:
        f.write(f"$ {cmd}\n")
        f.flush()
        rc = subprocess.run(cmd, shell=True, cwd=cwd, env=env, stdout=f, stderr=subprocess.STDOUT,
                            timeout=timeout).returncode
    seconds = round(time.monotonic() - start, 1)
    print(f"{seconds:7.1f} s  rc {rc}  {cmd[:110]}", file=sys.stderr, flush=True)
    return [cmd, seconds, rc]


def guide_commands():
    text = open(os.path.join(ROOT, "docs", "quickstart.md")).read()
    blocks = re.findall(r"```bash\n(.*?)```", text, re.S)
    lines = [line.strip() for block in blocks for line in block.splitlines()]
    return [line for line in lines if line and not line.startswith("#")]


def scores(folder, name, base, labels):
    rows = {r["name"]: r for r in read_rows(os.path.join(folder, name)) if "caption" in r}
    n = max(len(rows), 1)
    return {"captions": len(rows),
            "same_as_base": sum(r["caption"] == base.get(k) for k, r in rows.items()) / n,
            "loop": sum(bool(r.get("loop")) for r in rows.values()) / n,
            "truncated": sum(bool(r.get("truncated")) for r in rows.values()) / n,
            "teacher_wording": sum("shape" in r["caption"] and "background" in r["caption"]
                                   for r in rows.values()) / n,
            "agreement_with_teacher": sum(agreement(r["caption"], labels.get(k, ""))
                                          for k, r in rows.items()) / n}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--busy", type=int, default=0, help="busy-loop processes beside it")
    p.add_argument("--out", help="the results file (default: results/newcomer-DATE[-busy].json)")
    p.add_argument("--keep", help="work in this folder and keep it (default: a temporary one)")
    args = p.parse_args(argv)
    day = datetime.date.today().isoformat()
    name = f"newcomer-{day}{'-busy' if args.busy else ''}.json"
    out = args.out or os.path.join(ROOT, "results", name)
    work = args.keep or tempfile.mkdtemp(prefix="newcomer-")
    clone, venv, log = (os.path.join(work, f) for f in ("clone", "venv", "log.txt"))
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["PATH"] = os.path.join(venv, "bin") + os.pathsep + env["PATH"]
    commands, hogs, teacher = [], [], None
    try:
        subprocess.run(["git", "clone", "-q", ROOT, clone], check=True)
        commands.append(timed(f"{sys.executable} -m venv {venv}", work, env, log))
        commands.append(timed("pip install -q torch==2.13.0", clone, env, log))
        commands.append(timed("pip install -q -r requirements.txt", clone, env, log))
        hogs = [subprocess.Popen([sys.executable, "-c", "while 1: pass"]) for _ in range(args.busy)]
        if hogs:
            time.sleep(60)
        load = os.getloadavg()[0]
        commands.append(timed("python toy.py", clone, env, log))
        with open(log) as f:
            check = [line.strip() for line in f if "outside" in line or "OUT" in line]
        videos = os.path.join(clone, "my_videos")
        os.makedirs(videos)
        for i in range(24):
            shutil.copy(os.path.join(clone, "toy_out", "world", f"test_video_{i:05d}.mp4"), videos)
        port = free_port()
        teacher = subprocess.Popen(["python", "-m", "lab.standin_teacher", "--port", str(port)],
                                   cwd=clone, env=env, stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL)
        time.sleep(3)
        before = "python caption.py my_videos/ --model toy_out/stage2 --out base.jsonl"
        for command in [before] + guide_commands():
            command = command.replace("localhost:8000", f"127.0.0.1:{port}")
            commands.append(timed(command, clone, env, log))

        def said(name):
            rows = read_rows(os.path.join(clone, name))
            return {r["name"]: r["caption"] for r in rows if "caption" in r}
        base, labels, after = said("base.jsonl"), said("clean.jsonl"), said("captions.jsonl")
        captions = {name: scores(clone, name, base, labels)
                    for name in ("base.jsonl", "captions.jsonl", "captions2.jsonl")}
        examples = [{"video": k, "base": base.get(k), "teacher": labels[k], "after": after.get(k)}
                    for k in sorted(labels)[:3]]
    finally:
        for proc in hogs + ([teacher] if teacher else []):
            proc.kill()
    beside = f"{args.busy} busy-loop processes beside it" if args.busy else "alone"
    cores = len(os.sched_getaffinity(0))
    report = {"machine": f"this repository's {cores}-core {cpu_model()}, {beside}",
              "load_at_toy_start": load, "commands": commands, "toy_check": check,
              "captions": captions, "examples": examples}
    with open(out, "w") as f:
        json.dump(report, f, indent=1)
    print(json.dumps({k: report[k] for k in ("toy_check", "captions")}, indent=1), file=sys.stderr)
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
