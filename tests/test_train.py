"""train.py on tiny random models (fp32, CPU): it learns, 2 ranks == 1 process, resume == no
interruption, frozen stays frozen, checkpointing changes no gradient, the export captions and loads
in peft."""

import json
import os
import shutil
import signal
import sys
import time

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from lab.synthetic import write_image
from plumbing.jsonl import read_rows

from helpers import TEXT, VISION, make_tokenizer, tiny_checkpoint
from tools import ROOT, free_port, run_command, run_tool
from videos import write_video

CAPTIONS = ["a red circle moves left then down",
            "the video shows a green square sliding to the right",
            "a blue background with a quick brown fox", "hello world new line here",
            "system prompt you are a helpful assistant", "the quick brown dog jumps",
            "a green circle on blue", "red square moves down"]


def coloured(colour):
    def frame(i, w, h):
        a = np.zeros((h, w, 3), np.uint8)
        a[:] = colour
        a[(i * 3) % h: (i * 3) % h + 8, :w // 2] = 255 - np.array(colour)
        return a
    return frame


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    d = tmp_path_factory.mktemp("world")
    tok = make_tokenizer(str(d / "tok"))
    config = dict(vision_config=VISION, text_config={**TEXT, "vocab_size": 402},
                  image_token_index=400, pad_token_id=401, pooling_shape=[4, 2, 2], num_frames=4)
    json.dump(config, open(d / "config.json", "w"))
    rows = []
    rng = np.random.default_rng(0)
    for i, caption in enumerate(CAPTIONS):
        colour = tuple(int(c) for c in rng.integers(0, 255, 3))
        path = write_video(str(d / f"v{i}.mp4"), n_frames=12, frame_fn=coloured(colour))
        rows.append({"video": os.path.basename(path), "caption": caption})
    with open(d / "train.jsonl", "w") as f:
        f.write("\n".join(json.dumps(r) for r in rows) + "\n")
    return dict(dir=d, tok=tok, config=str(d / "config.json"), data=str(d / "train.jsonl"))


def train_args(world, out, *extra):
    return ["--data", world["data"], "--video-root", str(world["dir"]), "--out", str(out),
            "--init-from-config", world["config"], "--tokenizer", world["tok"], "--workers", "1",
            "--log-every", "1", *extra]


def run(args, nproc=1, **kw):
    if nproc == 1:
        cmd = [sys.executable, os.path.join(ROOT, "train.py"), *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
               f"--master_port={free_port()}", os.path.join(ROOT, "train.py"), *args]
    r = run_command(cmd, timeout=600, **kw)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    return r


def losses(out):
    return [r["loss"] for r in read_rows(os.path.join(out, "metrics.jsonl")) if "loss" in r]


@pytest.mark.slow
def test_loss_falls_on_a_tiny_set(world, tmp_path):
    run(train_args(world, tmp_path / "all", "--train-all", "--max-steps", "100", "--batch-size",
                   "4", "--lr", "1e-2", "--warmup-steps", "5", "--weight-decay", "0",
                   "--log-every", "1"))
    curve = losses(tmp_path / "all")
    assert len(curve) == 100 and curve[-1] < 0.1 * curve[0]
    # the report's recipe (LoRA on q_proj, k_proj + projector) from a checkpoint folder, via --model
    ckpt = tiny_checkpoint(str(tmp_path / "ckpt"), seed=2)
    args = [a for a in train_args(world, tmp_path / "lora") if a not in ("--init-from-config",
                                                                         world["config"])]
    run(args + ["--model", ckpt, "--max-steps", "40", "--batch-size", "4", "--lr", "1e-2",
                "--lora-r", "8"])
    curve = losses(tmp_path / "lora")
    assert curve[-1] < 0.65 * curve[0]


def weights(folder):
    w = load_file(os.path.join(folder, "model.safetensors"))
    if os.path.exists(os.path.join(folder, "adapter_model.safetensors")):
        w.update(load_file(os.path.join(folder, "adapter_model.safetensors")))
    return w


@pytest.mark.slow
def test_two_ranks_train_the_same_weights_as_one_process(world, tmp_path):
    common = ["--max-steps", "3", "--lr", "1e-2", "--lora-r", "4", "--lora-dropout", "0",
              "--grad-accum", "2"]
    one = run(train_args(world, tmp_path / "one", "--batch-size", "2", "--export",
                         str(tmp_path / "e1"), *common))
    two = run(train_args(world, tmp_path / "two", "--batch-size", "1", "--export",
                         str(tmp_path / "e2"), "--activation-checkpointing", "on", *common), 2)
    w1, w2 = weights(tmp_path / "e1"), weights(tmp_path / "e2")
    assert w1.keys() == w2.keys()
    trained = [k for k in w1 if "lora_" in k or "multi_modal_projector" in k]
    assert len(trained) == 4 * TEXT["num_hidden_layers"] + 4
    for k in w1:
        assert torch.allclose(w1[k], w2[k], rtol=0, atol=1e-5), k
    assert losses(tmp_path / "one") == pytest.approx(losses(tmp_path / "two"), rel=1e-5)
    assert "2 process(es), global batch 4" in two.stderr
    assert "1 process(es), global batch 4" in one.stderr


@pytest.mark.slow
def test_sigkill_then_resume_equals_uninterrupted(world, tmp_path):
    common = ["--max-steps", "8", "--batch-size", "2", "--lr", "1e-2", "--lora-r", "4",
              "--save-every", "2"]
    run(train_args(world, tmp_path / "straight", "--export", str(tmp_path / "e_straight"), *common))
    out = tmp_path / "killed"
    args = train_args(world, out, "--export", str(tmp_path / "e_resumed"), *common)
    proc = run_tool("train.py", args, wait=False, output=False)
    ckpt = out / "checkpoints" / "step_00000004"
    deadline = time.time() + 300
    while time.time() < deadline and not ckpt.exists():
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert ckpt.exists() and not (out / "checkpoints" / "step_00000008").exists()
    # a save that a kill cut short
    (out / "checkpoints" / "step_00000099.tmp").mkdir(exist_ok=True)
    run(args + ["--resume"])
    steps = [m["step"] for m in read_rows(str(out / "metrics.jsonl")) if "loss" in m]
    # the steps redone are logged once
    assert steps == list(range(1, 9))
    a, b = weights(tmp_path / "e_straight"), weights(tmp_path / "e_resumed")
    for k in a:
        assert torch.allclose(a[k], b[k], rtol=0, atol=1e-6), k
    assert sorted(os.listdir(out / "checkpoints")) == ["step_00000004", "step_00000006",
                                                       "step_00000008"]
    saved = os.listdir(out / "checkpoints" / "step_00000008")
    assert {"adapter_model.safetensors", "adapter_config.json", "projector.safetensors",
            "state.json"} <= set(saved)


@pytest.mark.slow
def test_two_ranks_resume_from_an_older_checkpoint(world, tmp_path):
    """Under FSDP2 each rank reloads its shards of the trainable weights and of the optimizer
    state."""
    common = ["--max-steps", "4", "--batch-size", "1", "--lr", "1e-2", "--lora-r", "4",
              "--save-every", "2"]
    out = tmp_path / "run"
    args = train_args(world, out, *common)
    run(args + ["--export", str(tmp_path / "e_straight")], 2)
    # as if killed after step 2's checkpoint
    shutil.rmtree(out / "checkpoints" / "step_00000004")
    resumed = run(args + ["--export", str(tmp_path / "e_resumed"), "--resume"], 2)
    assert "steps 2..4" in resumed.stderr
    a, b = weights(tmp_path / "e_straight"), weights(tmp_path / "e_resumed")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], rtol=0, atol=1e-6), k

@pytest.mark.parametrize("mode", ["lora", "--full-finetune", "--train-all"])
def test_only_what_the_mode_unfreezes_changes(world, tmp_path, mode):
    from model import PLLaVA
    flags = [] if mode == "lora" else [mode]
    run(train_args(world, tmp_path / "o", "--max-steps", "2", "--batch-size", "2", "--lr", "1e-2",
                   "--lora-r", "4", "--export", str(tmp_path / "e"), *flags))
    from config import Config
    start = PLLaVA.from_config(Config.from_dict(json.load(open(world["config"]))),
                               seed=0).state_dict()
    after = weights(tmp_path / "e")
    assert any("lora_" in k for k in after) == (mode == "lora")
    # after layer -2
    unused = ("vision_tower.vision_model.encoder.layers.2.",
              "vision_tower.vision_model.post_layernorm.")
    for k, v in start.items():
        learns = {"lora": k.startswith("multi_modal_projector"),
                  "--full-finetune": not k.startswith("vision_tower"),
                  "--train-all": not k.startswith(unused)}[mode]
        assert torch.equal(after[k], v) != learns, k


def test_activation_checkpointing_gives_the_same_gradients(world, monkeypatch):
    import model as model_py
    from config import Config
    from lora import add_lora
    from model import PLLaVA
    calls, forward = [], model_py.Block.forward
    monkeypatch.setattr(model_py.Block, "forward",
                        lambda self, *a: calls.append(1) or forward(self, *a))
    model = PLLaVA.from_config(Config.from_dict(json.load(open(world["config"]))), seed=0)
    add_lora(model.language_model, r=4, alpha=8, dropout=0.0)
    for n, p in model.named_parameters():
        p.requires_grad = "lora_" in n or "projector" in n
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.1)   # a fresh B is zero, and so would A's gradient be
    ids = torch.tensor([[1, 5, 400, 7, 8, 9, 10]] * 2)
    labels = ids.masked_fill(torch.arange(7) < 4, -100)
    pixels = torch.randn(2, 4, 3, 28, 28)
    grads = []
    for on in (False, True):
        model.language_model.recompute = model.vision_tower.vision_model.recompute = on
        model.zero_grad()
        calls.clear()
        model(ids, pixels, labels=labels).backward()
        # recomputed in backward when on
        assert len(calls) == TEXT["num_hidden_layers"] * (2 if on else 1)
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) == 4 * TEXT["num_hidden_layers"] + 4
    for n in grads[0]:
        assert grads[0][n].abs().sum() > 0, n
        assert torch.allclose(grads[0][n], grads[1][n], atol=1e-7), n


def test_loss_counts_answer_tokens_only(world):
    """model(..., labels) equals the cross-entropy of the full logits at the answer positions alone;
    a sample whose prompt differs has its labels in the same places with the same values."""
    from config import Config
    from training.dataset import collate
    from model import PLLaVA
    from tokenizer import Tokenizer, training_ids
    tok = Tokenizer(world["tok"])
    model = PLLaVA.from_config(Config.from_dict(json.load(open(world["config"]))), seed=0)
    a = training_ids(tok, [("describe it", "a red circle")])
    b = training_ids(tok, [("DESCRIBE THIS ONE PLEASE", "a red circle")])
    assert [l for l in a[1] if l != -100] == [l for l in b[1] if l != -100]
    batch = collate([dict(ids=ids, labels=labels, frames=np.zeros((4, 28, 28, 3), np.uint8),
                          skipped=None) for ids, labels in (a, b)], pad_id=401)
    pixels = torch.randn(2, 4, 3, 28, 28)
    loss = model(batch["ids"], pixels, labels=batch["labels"])
    # (B, L + 15, V): 16 visual tokens
    logits = model(batch["ids"], pixels)
    rows = []
    for ids, labels in zip(batch["ids"], batch["labels"]):
        # the <image> slot: no loss there
        p = ids.tolist().index(400)
        rows.append(torch.cat([labels[:p], torch.full((16,), -100), labels[p + 1:]]))
    full_labels = torch.stack(rows)
    want = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 402),
                                             full_labels[:, 1:].reshape(-1))
    assert torch.allclose(loss, want, rtol=1e-5)


@pytest.mark.slow
def test_export_captions_and_loads_in_peft(world, tmp_path):
    from peft import PeftModel
    from transformers import LlavaForConditionalGeneration

    from model import PLLaVA

    from helpers import causal_lm
    export = tmp_path / "export"
    run(train_args(world, tmp_path / "o", "--max-steps", "3", "--batch-size", "2", "--lr", "1e-2",
                   "--lora-r", "4", "--lora-alpha", "8", "--export", str(export)))
    assert {"config.json", "model.safetensors", "adapter_config.json", "adapter_model.safetensors",
            "tokenizer.model", "tokenizer_config.json", "prompt.json"} <= set(os.listdir(export))
    from tokenizer import QUESTION, SYSTEM, load_prompt
    # caption.py's default
    assert load_prompt(str(export)) == {"question": QUESTION, "system": SYSTEM,
                                        "template": "vicuna"}
    umask = os.umask(0o022)
    os.umask(umask)
    # as any new file
    assert all(os.stat(export / f).st_mode & 0o777 == 0o666 & ~umask for f in os.listdir(export))
    r = run_tool("caption.py",
                 [world["dir"] / "v0.mp4", "--model", export, "--out", tmp_path / "c.jsonl",
                  "--max-new-tokens", "5"])
    assert r.returncode == 0, r.stderr
    assert read_rows(str(tmp_path / "c.jsonl"))[0]["tokens"] >= 1
    ours = PLLaVA.from_pretrained(str(export))
    base = LlavaForConditionalGeneration.from_pretrained(str(export)).eval()
    peft = PeftModel.from_pretrained(causal_lm(base), str(export)).eval()
    ids = torch.randint(3, 300, (1, 12))
    with torch.no_grad():
        x = ours.language_model.model.embed_tokens(ids)
        want = peft(inputs_embeds=x).logits
        got = ours.language_model.lm_head(ours.language_model(x, torch.arange(12)[None]))
    assert ((got - want).abs().max() / want.abs().max()) < 1e-5
    # a model folder's own preprocessor_config.json is what training normalizes with and what its
    # export carries to caption.py, whatever --tokenizer names
    pre = {"image_mean": [0.5, 0.4, 0.3], "image_std": [0.2, 0.25, 0.3]}
    (export / "preprocessor_config.json").write_text(json.dumps(pre))
    from training import trainable
    assert trainable.preprocessing_folder(str(export), world["tok"]) == str(export)
    again = tmp_path / "again"
    run(["--data", world["data"], "--video-root", str(world["dir"]), "--out", str(tmp_path / "o2"),
         "--model", str(export), "--tokenizer", world["tok"], "--workers", "1", "--max-steps", "1",
         "--batch-size", "2", "--export", str(again)])
    assert json.loads((again / "preprocessor_config.json").read_text()) == pre


def test_data_shapes_images_and_unreadable_videos(world, tmp_path):
    from training.dataset import read_samples
    d = world["dir"]
    write_image(str(tmp_path / "still.png"), np.full((48, 64, 3), 90, np.uint8))
    open(tmp_path / "broken.mp4", "w").write("not a video")
    rows = {"labels.jsonl": [{"video": str(d / "v0.mp4"), "caption": "a"},
                             {"video": "x.mp4", "error": "HTTP 400"},
                             {"video": str(tmp_path / "broken.mp4"), "caption": "never read"}],
            "qa.jsonl": [{"video": str(d / "v1.mp4"),
                          "QA": [{"i": "Watch.", "q": "what?", "a": "b"},
                                 {"i": "", "q": "then?", "a": "c"}]}],
            "llava.jsonl": [{"image": str(tmp_path / "still.png"),
                             "conversations": [{"from": "human", "value": "<image>\nwhat is it?"},
                                               {"from": "gpt", "value": "d"}]}]}
    paths = []
    for name, lines in rows.items():
        paths.append(str(tmp_path / name))
        open(paths[-1], "w").write("\n".join(json.dumps(r) for r in lines) + "\n")
    samples, dropped, bad = read_samples(paths)
    assert dropped == 1 and len(samples) == 4 and bad == []
    assert samples[2][2:] == ([("what?", "b"), ("then?", "c")], "Watch.", None)
    assert samples[3][1] is True and samples[3][2] == [("what is it?", "d")]
    r = run(train_args(world, tmp_path / "o", "--max-steps", "2", "--batch-size", "2", "--lr",
                       "1e-3", "--lora-r", "4", "--data", ",".join(paths), "--eval-data",
                       world["data"], "--eval-every", "1"))
    assert "skipped: " + str(tmp_path / "broken.mp4") in r.stderr
    metrics = read_rows(str(tmp_path / "o" / "metrics.jsonl"))
    assert metrics[-2]["skipped"] == 1
    assert "eval_loss" in metrics[-1] and metrics[-1]["eval_loss"] > 0


def test_training_on_rows_of_shots(world, tmp_path):
    """Rows with start / end (caption.py or label.py --shots): frames are sampled inside each
    span."""
    rows = [dict(r, start=s, end=s + 0.24) for r in read_rows(world["data"]) for s in (0.0, 0.24)]
    data = tmp_path / "shots.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    r = run(train_args(world, tmp_path / "o", "--max-steps", "4", "--batch-size", "2", "--lora-r",
                       "4", "--data", str(data)))
    assert "16 samples (0 rows left out)" in r.stderr
    logged = [m for m in read_rows(str(tmp_path / "o" / "metrics.jsonl")) if "loss" in m]
    assert len(logged) == 4 and all(np.isfinite(m["loss"]) for m in logged)
    assert logged[-1]["skipped"] == 0
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(dict(rows[0], start=0.3,
                                   end=0.1)) + "\n" + json.dumps(rows[1]) + "\n")
    from training.dataset import read_samples
    samples, _, broken = read_samples([str(bad)], str(world["dir"]))
    assert len(samples) == 1 and samples[0][4] == (0.24, 0.48) and "start / end" in broken[0]
