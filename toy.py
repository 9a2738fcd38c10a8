"""The whole loop on a laptop CPU, on a synthetic video world: python toy.py [--out DIR] [--quick] [--ablations] [--nproc N]

1. A world: videos of a coloured shape that rests, moves (one direction, or two in order) and rests again,
   on varied backgrounds, each with its generator's caption; still images of the same objects; a
   SentencePiece tokenizer trained on the captions.
2. Stage 1, an image-LLM from scratch: `train.py --train-all` on stills ("a red circle at the top left.")
   and on long-exposure stills whose motion shows as a fading trail. The trails stand in for what a real
   image-LLM brings from its text pretraining: the words and grammar of motion. The videos never have
   trails: reading motion from time is what stage 2 must learn.
3. Stage 2, the seed's post-training: `train.py` (LoRA on q_proj/k_proj + the projector) on the videos.
4. `caption.py` on held-out test videos, scored attribute by attribute against the generator's truth.
5. --ablations: pooling that collapses time (T'=1) and Video-ChatGPT's pooling in place of PLLaVA's; the
   LoRA share alpha swept at inference; full fine-tuning instead of LoRA; each also scored on stills
   (the image skill stage 2 may have made the model forget).
Everything runs through the same train.py / caption.py a 16-GPU run uses, as subprocesses.
"""

import json
import os
import re
import shutil
import subprocess
import sys
import time

import numpy as np

import cli
from jsonl import read_rows
from synthetic import write_image, write_video
from tokenizer import train_tokenizer

MARK = ".toy-run"   # in every --out folder toy.py makes: the only folders it deletes
HERE = os.path.dirname(os.path.abspath(__file__))
SIZE = 48
COLOURS = {"red": (220, 45, 45), "green": (40, 170, 60), "blue": (50, 90, 235), "yellow": (235, 205, 35)}
SHAPES = ("circle", "square", "triangle")
CENTRES = (8, 24, 40)    # pixel centres of the 3 x 3 grid of positions: one 16-pixel ViT patch each
NAMES = {(0, 0): "top left", (1, 0): "top", (2, 0): "top right", (0, 1): "left", (1, 1): "center", (2, 1): "right",
         (0, 2): "bottom left", (1, 2): "bottom", (2, 2): "bottom right"}
DIRS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
# a move crosses the whole grid (two cells); a two-step move turns once, so it starts in a corner
MOTIONS = [(d,) for d in DIRS] + [(a, b) for a in DIRS for b in DIRS if DIRS[a][0] * DIRS[b][0] + DIRS[a][1] * DIRS[b][1] == 0
                                   and DIRS[a] != DIRS[b]]
SYSTEM = "You are a helpful assistant."
VIDEO_Q, IMAGE_Q = "Describe this video.", "Describe this image."
SIZES = {   # (train videos, test videos, train stills, test stills, stage 1 steps, stage 2 steps, batch)
    "default": (1600, 200, 2400, 120, 1200, 600, 16),
    "quick": (480, 96, 1200, 48, 900, 250, 16),
}


def starts(motion):
    """The grid cells a motion can start from without leaving the grid."""
    cells = []
    for cell in NAMES:
        x, y = cell
        for d in motion:
            x, y = x + 2 * DIRS[d][0], y + 2 * DIRS[d][1]
            if not (0 <= x <= 2 and 0 <= y <= 2):
                break
        else:
            cells.append(cell)
    return cells


def video_caption(colour, shape, cell, motion):
    return f"a {colour} {shape} starts at the {NAMES[cell]} and moves {', then '.join(motion)}."


def still_caption(colour, shape, cell):
    return f"a {colour} {shape} at the {NAMES[cell]}."


def background(rng):
    """A dark random colour with a gradient and a little noise. Dark, because on backgrounds as bright
    as the objects a ViT this small needed many times the steps to tell a square from a circle."""
    base = rng.integers(15, 75, 3)
    ramp = np.linspace(-12, 12, SIZE)[:, None, None] * rng.choice([-1, 1])
    img = base[None, None, :] + (ramp if rng.random() < 0.5 else ramp.transpose(1, 0, 2))
    return np.clip(img + rng.normal(0, 3, (SIZE, SIZE, 3)), 0, 255).astype(np.uint8)


def draw(img, shape, colour, cx, cy, r, alpha=1.0):
    y, x = np.mgrid[0:SIZE, 0:SIZE]
    if shape == "circle":   # smaller than the square: at 48 px they differ in their corners alone otherwise
        mask = (x - cx) ** 2 + (y - cy) ** 2 <= (0.8 * r) ** 2
    elif shape == "square":
        mask = (abs(x - cx) <= r * 0.95) & (abs(y - cy) <= r * 0.95)
    else:   # triangle, point up
        mask = (y >= cy - r) & (y <= cy + r * 0.8) & (abs(x - cx) <= (y - (cy - r)) * 0.6)
    img[mask] = (alpha * np.array(COLOURS[colour]) + (1 - alpha) * img[mask]).astype(np.uint8)
    return img


def path(cell, motion, frames, rng, hold=0):
    """Pixel centres frame by frame: `hold` frames at rest at each end, and in between a straight move,
    or two legs of equal length one after the other."""
    corners = [(CENTRES[cell[0]], CENTRES[cell[1]])]
    for d in motion:
        corners.append((corners[-1][0] + 32 * DIRS[d][0], corners[-1][1] + 32 * DIRS[d][1]))
    t = np.clip((np.arange(frames) - hold) / max(1, frames - 1 - 2 * hold), 0, 1) * len(motion)
    leg = np.minimum(t.astype(int), len(motion) - 1)
    frac = (t - leg)[:, None]
    a, b = np.array(corners[:-1])[leg], np.array(corners[1:])[leg]
    return a + (b - a) * frac + rng.normal(0, 0.5, (frames, 2))


def make_world(folder, n_train, n_test, n_stills, n_test_stills, frames, seed):
    """Videos and stills on disk, with JSONL files of their captions; the generator's truth kept beside."""
    rng = np.random.default_rng(seed)
    os.makedirs(folder, exist_ok=True)
    files = {}
    for split, n in (("train", n_train), ("test", n_test)):
        rows = []
        for i in range(n):
            colour, shape = rng.choice(list(COLOURS)), rng.choice(SHAPES)
            motion = MOTIONS[rng.integers(len(MOTIONS))]
            cell = starts(motion)[rng.integers(len(starts(motion)))]
            bg, r = background(rng), rng.uniform(7, 7.5)
            clip = [draw(bg.copy(), shape, colour, x, y, r) for x, y in path(cell, motion, frames, rng, frames // 5)]
            name = os.path.join(folder, f"{split}_video_{i:05d}.mp4")
            write_video(name, clip, fps=8, options={"crf": "12", "preset": "ultrafast"})
            rows.append({"video": name, "caption": video_caption(colour, shape, cell, motion),
                         "truth": {"colour": colour, "shape": shape, "position": NAMES[cell], "motion": list(motion)}})
        files[f"{split}_videos"] = rows
    for split, n in (("train", n_stills), ("test", n_test_stills)):
        rows = []
        for i in range(n):
            colour, shape = rng.choice(list(COLOURS)), rng.choice(SHAPES)
            name = os.path.join(folder, f"{split}_still_{i:05d}.png")
            if split == "train" and i % 2:   # a long-exposure photo: the motion as a fading trail
                motion = MOTIONS[rng.integers(len(MOTIONS))]
                cell = starts(motion)[rng.integers(len(starts(motion)))]
                img, r = background(rng), rng.uniform(7, 7.5)
                for k, (x, y) in enumerate(path(cell, motion, 8, rng)):
                    img = draw(img, shape, colour, x, y, r, alpha=0.2 + 0.8 * k / 7)
                caption = video_caption(colour, shape, cell, motion)
            else:
                cell = list(NAMES)[rng.integers(9)]
                x, y = CENTRES[cell[0]] + rng.normal(0, 0.5), CENTRES[cell[1]] + rng.normal(0, 0.5)
                img, caption = draw(background(rng), shape, colour, x, y, rng.uniform(7, 7.5)), still_caption(colour, shape, cell)
            write_image(name, img)
            rows.append({"image": name, "caption": caption,
                         "truth": {"colour": colour, "shape": shape, "position": NAMES[cell]}})
        files[f"{split}_stills"] = rows
    for name, rows in files.items():
        with open(os.path.join(folder, f"{name}.jsonl"), "w") as f:
            f.write("".join(json.dumps(r) + "\n" for r in rows))
    prompts = [SYSTEM, VIDEO_Q, IMAGE_Q, "USER: ASSISTANT:"] * 300   # frequent enough to become whole pieces
    texts = [r["caption"] for rows in files.values() for r in rows] + prompts
    train_tokenizer(os.path.join(folder, "tokenizer"), texts, vocab_size=512)   # 259 are bytes and specials
    return files


def toy_config(tok_folder, frames, pooling="pllava", t_pool=None):
    from tokenizer import Tokenizer
    tok = Tokenizer(tok_folder)
    return dict(vision_config=dict(hidden_size=96, intermediate_size=192, num_hidden_layers=3, num_attention_heads=4,
                                   image_size=SIZE, patch_size=16),
                # two wide-headed layers: deeper ones took several times the steps to learn to read shapes
                text_config=dict(vocab_size=len(tok), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                 num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=1024,
                                 rms_norm_eps=1e-5),
                image_token_index=tok.image_id, pad_token_id=tok.pad_id, num_frames=frames, pooling=pooling,
                pooling_shape=[t_pool or frames, 3, 3])


def run(cmd, log, nproc=1, watch=None):
    """A stage as its own process (torchrun for nproc > 1); its output goes to a log file, and every few
    seconds a progress line with an ETA: watch() gives (done, total), from the rows the stage has written."""
    if nproc > 1:
        cmd = ["-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--standalone"] + cmd
    start = time.monotonic()
    with open(log, "w") as f:
        proc = subprocess.Popen([sys.executable, *cmd], cwd=HERE, stdout=f, stderr=subprocess.STDOUT,
                                env={**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 2) // nproc))})
        shown = start
        while proc.poll() is None:
            time.sleep(0.5)
            done, total = watch() if watch and time.monotonic() - shown > 10 else (0, 0)
            if done:
                shown = time.monotonic()
                eta = (time.monotonic() - start) * (total - done) / done
                print(f"\r  {os.path.basename(log)[:-4]}: {done}/{total}, ETA {eta:.0f} s (log: {log})   ", end="",
                      file=sys.stderr, flush=True)
    if watch:
        print(file=sys.stderr)
    if proc.returncode != 0:
        sys.exit(f"failed: {' '.join(cmd)} (see {log})")
    return time.monotonic() - start


def train(out, data, model, steps, batch, lr, log, extra=(), nproc=1):
    args = [os.path.join(HERE, "train.py"), "--data", data, "--out", out + "_run", "--export", out,
            "--max-steps", str(steps), "--batch-size", str(batch // nproc), "--lr", str(lr),
            "--warmup-steps", str(steps // 20), "--workers", "0", "--log-every", "25", "--seed", "0",
            "--system", SYSTEM, "--max-text-tokens", "64", *model, *extra]
    metrics = os.path.join(out + "_run", "metrics.jsonl")
    return run(args, log, nproc, lambda: (max([r.get("step", 0) for r in read_rows(metrics)], default=0), steps))


def caption(model, rows_file, out, question, log, alpha=None, frames=None):
    args = [os.path.join(HERE, "caption.py"), rows_file, "--model", model, "--out", out, "--overwrite",
            "--prompt", question, "--system", SYSTEM, "--max-new-tokens", "24", "--batch-size", "16",
            "--workers", "1", "--stop", "\n"]
    args += ["--lora-alpha", str(alpha)] if alpha is not None else []
    args += ["--frames", str(frames)] if frames else []
    total = len(read_rows(rows_file))
    run(args, log, watch=lambda: (len(read_rows(out)), total))
    return {r["video"]: r.get("caption", "") for r in read_rows(out)}


def parse(text):
    """Attributes named in a generated caption: what the scoring compares with the generator's truth."""
    words = re.findall(r"[a-z]+", text.lower())
    where = re.search(r"at the ((?:top|bottom)(?: left| right)?|left|right|center)\b", text.lower())
    moves = re.search(r"moves ([a-z, ]+)", text.lower())
    return {"colour": next((w for w in words if w in COLOURS), None), "shape": next((w for w in words if w in SHAPES), None),
            "position": where.group(1) if where else None,
            "motion": [w for w in re.findall(r"[a-z]+", moves.group(1)) if w in DIRS] if moves else []}


def score(rows, captions, motion=True):
    """Accuracy (%) per attribute; motion compares the directions regardless of order, `order` the
    sequence of the two-step moves only; exact compares the whole caption."""
    hits = {k: [] for k in ("shape", "colour", "position", "motion", "order", "exact")}
    for row in rows:
        media = row.get("video") or row.get("image")
        got, truth = parse(captions.get(media, "")), row["truth"]
        for k in ("shape", "colour", "position"):
            hits[k].append(got[k] == truth[k])
        if motion:
            hits["motion"].append(sorted(got["motion"]) == sorted(truth["motion"]))
            if len(truth["motion"]) == 2:
                hits["order"].append(got["motion"] == truth["motion"])
        hits["exact"].append(captions.get(media, "").strip() == row["caption"])
    return {k: round(100.0 * sum(v) / len(v), 1) for k, v in hits.items() if v}


def table(results):
    rows = [("", "shape", "colour", "position", "motion", "order", "exact")]
    for name, r in results.items():
        rows.append((name, *[f"{r[k]:.1f}" if k in r else "-" for k in rows[0][1:]]))
    width = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, width)) for r in rows)


def main(argv=None):
    p = cli.Parser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="toy_out", help="the folder for the world, the models, the logs and results.json")
    p.add_argument("--quick", action="store_true", help="a smaller world and fewer steps (the CI test)")
    p.add_argument("--ablations", action="store_true", help="also the seed's experiments, one change at a time")
    p.add_argument("--nproc", type=cli.positive_int, default=1, help="processes for stage 2 (torchrun, FSDP2)")
    p.add_argument("--frames", type=cli.positive_int, default=4, help="frames the model sees per video")
    p.add_argument("--seed", type=int, default=0, help="of the world and of training")
    args = p.parse_args(argv)
    n_train, n_test, n_stills, n_test_stills, steps1, steps2, batch = SIZES["quick" if args.quick else "default"]
    out, start = os.path.abspath(args.out), time.monotonic()
    if os.path.isdir(out) and os.listdir(out):   # only an earlier toy run is ever deleted
        if not os.path.exists(os.path.join(out, MARK)):
            sys.exit(f"error: {out} holds files that are not an earlier toy run's: choose another --out")
        shutil.rmtree(out)
    world, logs = os.path.join(out, "world"), os.path.join(out, "logs")
    os.makedirs(logs)
    open(os.path.join(out, MARK), "w").close()

    def say(text):
        print(f"[{time.monotonic() - start:6.1f} s] {text}", flush=True)

    files = make_world(world, n_train, n_test, n_stills, n_test_stills, 16, args.seed)
    tok = os.path.join(world, "tokenizer")
    say(f"world: {n_train} + {n_test} videos, {n_stills} + {n_test_stills} stills, in {world}")
    config = os.path.join(out, "config.json")
    with open(config, "w") as f:
        json.dump(toy_config(tok, args.frames), f, indent=2)
    data = {k: os.path.join(world, f"{k}.jsonl") for k in files}
    stage1, stage2 = os.path.join(out, "stage1"), os.path.join(out, "stage2")
    seconds = train(stage1, data["train_stills"], ["--init-from-config", config, "--tokenizer", tok, "--train-all",
                                                  "--prompt", IMAGE_Q, "--weight-decay", "0"],
                    steps1, batch, 1e-3, os.path.join(logs, "stage1.log"))
    say(f"stage 1 (image-LLM from scratch, --train-all): {steps1} steps in {seconds:.0f} s")
    results, videos, stills = {}, files["test_videos"], files["test_stills"]

    def evaluate(name, model, alpha=None, on_stills=True):
        caps = caption(model, data["test_videos"], os.path.join(out, f"captions_{name}.jsonl"), VIDEO_Q,
                       os.path.join(logs, f"caption_{name}.log"), alpha)
        results[name] = score(videos, caps)
        if on_stills:
            caps = caption(model, data["test_stills"], os.path.join(out, f"stills_{name}.jsonl"), IMAGE_Q,
                           os.path.join(logs, f"stills_{name}.log"), alpha)
            results[name + " (stills)"] = score(stills, caps, motion=False)

    evaluate("stage 1", stage1)
    stage2_flags = ["--model", stage1, "--prompt", VIDEO_Q]
    seconds = train(stage2, data["train_videos"], stage2_flags, steps2, batch, 2e-3, os.path.join(logs, "stage2.log"),
                    nproc=args.nproc)
    say(f"stage 2 (LoRA q_proj,k_proj r=128 alpha=32 + projector, {args.nproc} process(es)): {steps2} steps in "
        f"{seconds:.0f} s")
    evaluate("stage 2", stage2)
    say("captioned and scored the held-out videos and stills")
    if args.ablations:
        ablations(args, out, data, stage1, stage2, steps2, batch, evaluate, say)
    summary = {"results": results, "seconds": round(time.monotonic() - start, 1), "quick": args.quick,
               "frames": args.frames, "nproc": args.nproc, "seed": args.seed, "depends_on": versions()}
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(summary, f, indent=2)
    print("\nAccuracy (%) on held-out test videos and stills:\n" + table(results))
    say(f"done; results in {os.path.join(out, 'results.json')}")
    return summary


def versions():
    """What the numbers depend on besides the seed: the libraries that encode the world and train on it."""
    import platform
    import av
    import torch
    return {"torch": torch.__version__, "av": av.__version__, "numpy": np.__version__, "python": platform.python_version(),
            "threads_per_stage": max(1, (os.cpu_count() or 2)), "cpu": platform.machine()}


def ablations(args, out, data, stage1, stage2, steps, batch, evaluate, say):
    """The seed's two claims: pooling must keep time; less LoRA at inference, and LoRA over full fine-tuning."""
    tok = os.path.join(out, "world", "tokenizer")
    for name, pooling, t_pool in (("pooling T'=1", "pllava", 1), ("Video-ChatGPT pooling", "vcgpt", None)):
        tag = name.split()[0].lower()
        start = os.path.join(out, f"stage1_{tag}")   # stage 1 with the other pooling
        shutil.copytree(stage1, start)
        cfg = json.load(open(os.path.join(start, "config.json")))
        cfg.update(pooling=pooling, pooling_shape=toy_config(tok, args.frames, pooling, t_pool)["pooling_shape"])
        json.dump(cfg, open(os.path.join(start, "config.json"), "w"), indent=2)
        model = os.path.join(out, f"stage2_{tag}")
        seconds = train(model, data["train_videos"], ["--model", start, "--prompt", VIDEO_Q], steps, batch, 2e-3,
                        os.path.join(out, "logs", f"{os.path.basename(model)}.log"))
        evaluate(name, model, on_stills=False)
        say(f"ablation {name}: stage 2 again in {seconds:.0f} s")
    for alpha in (0, 8, 16, 64):   # trained with 32
        evaluate(f"LoRA alpha {alpha}", stage2, alpha)
    say("ablation: LoRA alpha swept at inference")
    full = os.path.join(out, "stage2_full")
    seconds = train(full, data["train_videos"], ["--model", stage1, "--prompt", VIDEO_Q, "--full-finetune"], steps,
                    batch, 1e-3, os.path.join(out, "logs", "stage2_full.log"))
    evaluate("full fine-tune", full)
    say(f"ablation: full fine-tuning in {seconds:.0f} s")


if __name__ == "__main__":
    main()
