"""toy.py's experiments on the report's claims and on cleaning the teacher's labels: each trains
stage 2 again from the same stage 1 with one change, and scores it on the held-out videos (and
stills).

ablations: the report's two claims (pooling must keep time; LoRA and a lower share at inference
limit the harm of poor video labels). cleaning: the teacher's labels cleaned with evidence they did
not have, at a stated number of teacher calls a video (label.py recheck, and the alternatives it was
chosen over). toy.py hands over its own steps (train, caption, clean) as `toy`: this module never
imports it.
"""

import json
import os
import re
import shutil

import numpy as np

from labelling import checks
from lab.toyworld import (EIGHT_FRAMES, FRAMES, SECOND, TEACHER_FRAMES, TEACHERS, price, score,
                          teacher)
from plumbing.jsonl import read_rows


def ablations(args, out, data, stage1, stage2, steps, batch, evaluate, results, say, toy, **_):
    """The report's two claims. 1: pooling must keep time (T' = 1; Video-ChatGPT's pooling). 2:
    post-training an image-LLM with LoRA, and a lower LoRA share at inference, limits what poor
    video labels do to it: the share swept at inference with the projector trained (the report's
    recipe) and frozen (then alpha 0 is stage 1 itself), full fine-tuning, and the same LoRA on the
    generator's true captions; int8 too."""
    VIDEO_Q, toy_config, train = toy.VIDEO_Q, toy.toy_config, toy.train
    tok = os.path.join(out, "world", "tokenizer")
    for name, pooling, t_pool in (
        ("pooling T'=1", "pllava", 1),
        ("Video-ChatGPT pooling", "vcgpt", None),
    ):
        tag = name.split()[0].lower()
        start = os.path.join(out, f"stage1_{tag}")   # stage 1 with the other pooling
        shutil.copytree(stage1, start)
        cfg = json.load(open(os.path.join(start, "config.json")))
        cfg.update(pooling=pooling,
                   pooling_shape=toy_config(tok, args.frames, pooling, t_pool)["pooling_shape"])
        json.dump(cfg, open(os.path.join(start, "config.json"), "w"), indent=2)
        model = os.path.join(out, f"stage2_{tag}")
        seconds = train(
            model,
            data["train_clean"],
            ["--model", start, "--prompt", VIDEO_Q],
            steps,
            batch,
            2e-3,
            os.path.join(out, "logs", f"{os.path.basename(model)}.log"),
            args.seed,
        )
        evaluate(name, model, on_stills=False)
        say(f"ablation {name}: stage 2 again in {seconds:.0f} s")
    frozen = os.path.join(out, "stage2_frozen_projector")
    train(frozen, data["train_clean"],
          ["--model", stage1, "--prompt", VIDEO_Q, "--freeze-projector"], steps, batch, 2e-3,
          os.path.join(out, "logs", "stage2_frozen_projector.log"), args.seed)
    for alpha in (0, 8, 16, 64):   # trained with 32
        evaluate(f"LoRA alpha {alpha}", stage2, ["--lora-alpha", str(alpha)])
    for alpha in (0, 16, 32):
        evaluate(f"frozen projector, LoRA alpha {alpha}", frozen, ["--lora-alpha", str(alpha)])
    say("ablation: LoRA alpha swept at inference, projector trained and frozen")
    full = os.path.join(out, "stage2_full")
    seconds = train(full, data["train_clean"],
                    ["--model", stage1, "--prompt", VIDEO_Q, "--full-finetune"], steps, batch,
                    1e-3, os.path.join(out, "logs", "stage2_full.log"), args.seed)
    evaluate("full fine-tune", full)
    say(f"ablation: full fine-tuning in {seconds:.0f} s")
    truth = os.path.join(out, "stage2_truth")
    train(truth, data["train_videos"], ["--model", stage1, "--prompt", VIDEO_Q], steps, batch, 2e-3,
          os.path.join(out, "logs", "stage2_truth.log"), args.seed)
    evaluate("LoRA on true captions", truth)
    plain = {r["video"]: r["caption"] for r in read_rows(os.path.join(out,
                                                                      "captions_stage_2.jsonl"))}
    int8 = evaluate("stage 2, int8 weights", stage2, ["--quantize", "int8"], on_stills=False)
    results["stage 2, int8 weights"]["same caption as fp32"] = round(
        100.0 * np.mean([int8.get(v) == c for v, c in plain.items()]), 1)
    say("ablations: on true captions, and int8")


OTHER_FRAMES = [k - 2 for k in TEACHER_FRAMES]   # 0, 4, 8, 12: the four between the teacher's own


def cleaning(
    args, out, data, stage1, stage2, steps, batch, evaluate, results, say, files, toy, **_
):
    """The teacher's cleaned labels, cleaned again with evidence the labels did not have, and stage
    2 trained anew on each result: its calls to the teacher a video, the share of labels changed or
    dropped, and the student's scores (in results, "cleaning: ..."). The teacher sees only the
    frames it is shown; nothing is told the truth."""
    VIDEO_Q, caption, clean, train = toy.VIDEO_Q, toy.caption, toy.clean, toy.train
    world, logs = os.path.join(out, "world"), os.path.join(out, "logs")
    rows = {r["video"]: r for r in files["train_videos"]}
    kept = {r["video"]: r for r in read_rows(data["train_clean"])}
    student = caption(stage2, data["train_videos"], os.path.join(out, "student_on_train.jsonl"),
                      VIDEO_Q, os.path.join(logs, "student_on_train.log"))
    agree = {v: checks.agreement(kept[v]["caption"], student.get(v, "")) for v in kept}
    results["cleaning: student agrees with its labels (exact, %)"] = {
        "exact": round(100 * float(np.mean([a == 1.0 for a in agree.values()])), 1)}

    def relabel(videos, frames, seed):
        return {r["video"]: r for r in teacher([rows[v] for v in sorted(videos)], seed, frames)}

    # label.py recheck: the least agreeing share asked again from more frames
    def recheck(share, frames):
        chosen = checks.to_recheck({(v, None): r for v, r in kept.items()},
                                   {(v, None): c for v, c in student.items()}, share)
        new = relabel({k[0] for k in chosen}, frames, args.seed + 17)
        return {v: new.get(v, r) for v, r in kept.items()}, 1 + len(chosen) / len(rows), \
            (len(TEACHER_FRAMES) * len(rows) + len(frames) * len(chosen)) / len(rows)

    def drop(share):   # the disputed share left out, no call
        chosen = checks.to_recheck({(v, None): r for v, r in kept.items()},
                                   {(v, None): c for v, c in student.items()}, share)
        return {v: r for v, r in kept.items() if (v, None) not in chosen}, 1.0, len(TEACHER_FRAMES)

    def consensus():   # a second label from four other frames: a label both agree on, else none
        other = relabel(kept, OTHER_FRAMES, args.seed + 29)
        return ({v: r for v, r in kept.items() if other[v]["caption"] == r["caption"]}, 2.0,
                2 * len(TEACHER_FRAMES))

    def from_the_start(frames):   # every video labelled from more frames in the first place
        return relabel(rows, frames, args.seed + 31), 1.0, len(frames)

    every = list(range(FRAMES))
    variants = {
        "recheck 30% from 8 frames": lambda: recheck(0.3, EIGHT_FRAMES),
        "recheck 30% from 16 frames (label.py recheck's default)": lambda: recheck(0.3, every),
        "recheck 15% from 16 frames": lambda: recheck(0.15, every),
        "drop the disputed 30%": lambda: drop(0.3),
        "two labels from 4 frames each, kept where they agree": consensus,
        "every video from 8 frames": lambda: from_the_start(EIGHT_FRAMES),
        "every video from 16 frames": lambda: from_the_start(every),
    }
    for name, make in variants.items():
        labels, calls, frames = make()
        raw = os.path.join(world, f"cleaning_{len(results)}.jsonl")
        with open(raw, "w") as f:
            f.write("".join(json.dumps(r) + "\n" for r in labels.values()))
        cleaned = clean(raw, raw.replace(".jsonl", "_clean.jsonl"), os.path.join(logs, "clean.log"))
        after = {r["video"]: r["caption"] for r in cleaned}
        changed = sum(after.get(v) != r["caption"] for v, r in kept.items()) / len(kept)
        model = os.path.join(out, f"stage2_cleaning_{len(results)}")
        seconds = train(model, raw.replace(".jsonl", "_clean.jsonl"),
                        ["--model", stage1, "--prompt", VIDEO_Q], steps, batch, 2e-3,
                        os.path.join(logs, f"{os.path.basename(model)}.log"), args.seed)
        evaluate(f"cleaning: {name}", model, on_stills=False)
        results[f"cleaning: {name}"].update(
            {
                "teacher calls a video": round(calls, 3),
                "frames sent a video": round(frames, 2),
                "labels changed or dropped (%)": round(100 * changed, 1),
            }
        )
        say(
            f"cleaning {name}: {calls:.2f} calls and {frames:.1f} frames a video, "
            f"{100 * changed:.0f}% of labels changed or dropped, stage 2 again in {seconds:.0f} s"
        )


AUDIT_SHARE, SECOND_PRICE = 0.05, 1.0   # the audit's sample; the second source's price per token


def audit(args, out, data, stage1, steps, batch, evaluate, results, say, files, toy, **_):
    """For each kind of teacher (toyworld.TEACHERS, each with a confusion it makes on every call):
    its labels cleaned, then cleaned further three ways, and a student trained on each: recheck
    (the 30% its first student disputes most, asked again from 16 frames), drop that 30%, and audit
    + fix (5% of the labels asked of a second source with habits of its own; the confusion its
    report ranks first fixed by `label.py clean --fix A=B --how rewrite`, from the second source's
    reading of one frame of each video whose label says A). Beside them: the teacher on the test
    videos, and a student trained on the true captions. Each row: the scores, the calls a video and
    their price in teacher calls (toyworld.price; the second source's at SECOND_PRICE)."""
    VIDEO_Q, caption, clean, train = toy.VIDEO_Q, toy.caption, toy.clean, toy.train
    world, logs = os.path.join(out, "world"), os.path.join(out, "logs")
    n = len(files["train_videos"])
    rows = {r["video"]: r for r in files["train_videos"]}

    def student(name, labels, calls=1.0, cost=1.0, extra=()):
        """Stage 2 again on `labels` (a file, cleaned by label.py clean [extra] first)."""
        tag = re.sub(r"\W+", "_", name).strip("_")
        path, model = os.path.join(world, f"{tag}_clean.jsonl"), os.path.join(out, f"stage2_{tag}")
        cleaned = clean(labels, path, os.path.join(logs, f"{tag}_clean.log"), extra)
        seconds = train(model, path, ["--model", stage1, "--prompt", VIDEO_Q], steps, batch, 2e-3,
                        os.path.join(logs, f"stage2_{tag}.log"), args.seed)
        evaluate(name, model, on_stills=False)
        results[name].update({"calls a video": round(calls, 3), "price in teacher calls":
                              round(cost, 3), "labels kept": len(cleaned)})
        say(f"{name}: {calls:.2f} calls a video, priced {cost:.2f} teacher calls; stage 2 again "
            f"in {seconds:.0f} s")
        return model, {r["video"]: r for r in cleaned}

    def write(name, labels):
        with open(os.path.join(world, name), "w") as f:
            f.write("".join(json.dumps(r) + "\n" for r in labels))
        return os.path.join(world, name)

    student("true captions", data["train_videos"], 0, 0)
    for k, (kind, habits) in enumerate(TEACHERS.items()):
        test = teacher(files["test_videos"], args.seed + 43, habits=habits)
        results[f"{kind}: the teacher, test videos"] = score(
            files["test_videos"], {r["video"]: r["caption"] for r in test})
        labels = write(f"audit{k}_labels.jsonl",
                       teacher(files["train_videos"], args.seed + 41, habits=habits))
        first, kept = student(f"{kind}: clean only", labels)
        said = caption(first, data["train_videos"], os.path.join(out, f"audit{k}_student.jsonl"),
                       VIDEO_Q, os.path.join(logs, f"audit{k}_student.log"))
        disputed = checks.to_recheck({(v, None): r for v, r in kept.items()},
                                     {(v, None): c for v, c in said.items()}, 0.3)
        again = {r["video"]: r for r in teacher([rows[v] for v, _ in sorted(disputed)],
                                                args.seed + 47, range(FRAMES), habits)}
        student(f"{kind}: recheck 30% from 16 frames",
                write(f"audit{k}_recheck.jsonl", [again.get(v, r) for v, r in kept.items()]),
                1 + len(again) / n, 1 + len(again) / n * price(FRAMES))
        student(f"{kind}: drop the disputed 30%", write(
            f"audit{k}_drop.jsonl", [r for v, r in kept.items() if (v, None) not in disputed]))

        # the audit: a sample asked of the second source from the same 4 frames, and its report
        sample = [v for v, _ in checks.audit_sample({(v, None): r for v, r in kept.items()},
                                                    AUDIT_SHARE)]
        second = teacher([rows[v] for v in sample], args.seed + 53, habits=SECOND)
        audited = [{"video": v, "teacher": kept[v]["caption"], "caption": r["caption"]}
                   for v, r in zip(sample, second)]
        report = checks.audit_report(audited, "the second source")
        with open(os.path.join(out, f"audit{k}.report.txt"), "w") as f:
            f.write(report + "\n")
        say(f"{kind}: the audit's report\n{report}")
        found = checks.confusions([(r["teacher"], r["caption"]) for r in audited])
        if not found:
            continue
        top = found[0]   # what a person reading the report would fix first
        # the fix: every label that says A asked of the second source, from one frame
        asked = [v for v, r in kept.items() if checks.says(r["caption"], top["teacher"])]
        reread = teacher([rows[v] for v in asked], args.seed + 59, [FRAMES // 2], SECOND)
        fix = write(f"audit{k}_fix.jsonl", [{**r, "model": "second source",
                                             "teacher": kept[v]["caption"]}
                                            for v, r in zip(asked, reread)])
        results[f"{kind}: the audit"] = {
            "sampled": len(sample), "agreement": report.split("F1) ")[1].split(" (")[0],
            "first confusion": f"{top['teacher']} -> {top['second']}",
            "in": f"{top['videos']} of {top['of']}", "labels asked in the fix": len(asked)}
        student(f"{kind}: audit 5% + fix", write(f"audit{k}_kept.jsonl", kept.values()),
                1 + (len(sample) + len(asked)) / n,
                1 + (len(sample) * price(4, SECOND_PRICE)
                     + len(asked) * price(1, SECOND_PRICE)) / n,
                ["--fix", f"{top['teacher']}={top['second']}", "--how", "rewrite", "--audit", fix])


def audit_table(runs):
    """toy.py --audit over seeds (the results.json of each): for each kind of teacher, each method's
    mean score on each attribute (min-max over the seeds) and its price, with the goal checked: the
    student above its teacher on every attribute and, on the one the teacher gets wrong on every
    call (colour), within 5 points of the student trained on the true captions."""
    keys = ("shape", "colour", "position", "motion", "order", "exact", "invented")
    lines = []

    def mean(name, key):
        values = [r["results"][name][key] for r in runs if key in r["results"].get(name, {})]
        return (float(np.mean(values)), min(values), max(values)) if values else None

    for kind in TEACHERS:
        rows = {"the teacher (4 frames), test videos": f"{kind}: the teacher, test videos",
                **{m: f"{kind}: {m}" for m in ("clean only", "recheck 30% from 16 frames",
                                               "drop the disputed 30%", "audit 5% + fix")},
                "student on the true captions": "true captions"}
        lines += ["", f"{kind} ({len(runs)} seeds; mean [min-max]):",
                  "| | " + " | ".join(keys) + " | calls a video | price in teacher calls |",
                  "|---" * (len(keys) + 3) + "|"]
        for label, name in rows.items():
            cells = [mean(name, k) for k in keys + ("calls a video", "price in teacher calls")]
            lines.append(f"| {label} | " + " | ".join(
                "-" if c is None else f"{c[0]:.1f} [{c[1]:g}-{c[2]:g}]" if i < len(keys)
                else f"{c[0]:.2f}" for i, c in enumerate(cells)) + " |")
        teacher_, fixed, true = (rows["the teacher (4 frames), test videos"],
                                 rows["audit 5% + fix"], rows["student on the true captions"])
        below = [k for k in ("shape", "colour", "position", "motion", "exact")
                 if mean(fixed, k)[0] <= mean(teacher_, k)[0]]
        gap = mean(true, "colour")[0] - mean(fixed, "colour")[0]
        named = [r["results"].get(f"{kind}: the audit", {}) for r in runs]
        lines.append("the audit's first confusion, seed by seed: " + "; ".join(
            f"{a.get('first confusion')} in {a.get('in')} sampled, "
            f"{a.get('labels asked in the fix')} labels asked in the fix" for a in named))
        lines.append(f"audit + fix: above the teacher on every attribute but {below or 'none'}; "
                     f"colour {gap:.1f} points below the student on true captions; "
                     f"{mean(fixed, 'price in teacher calls')[0]:.2f} teacher calls a video")
    return "\n".join(lines)


if __name__ == "__main__":   # python -m lab.toyexperiments RESULTS.json ...: toy.py --audit's table
    import sys
    print(audit_table([json.load(open(f)) for f in sys.argv[1:]]))
