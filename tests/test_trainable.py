"""training/trainable.py: what trains, placed and checked before anything loads, and the memory
plan of a run (train.py --dry-run)."""

import re

import pytest

import train
from training import trainable

from tools import run_tool


def test_lora_goes_where_its_full_name_says_and_is_refused_outside_the_language_model(ckpt):
    """A layer's last name puts LoRA on that layer of every block; a full name on that one layer; a
    name in the vision tower or the projector is refused in one line (on a meta copy: nothing has
    loaded)."""
    def trained(targets):
        s = train.parse_args(["--data", "d.jsonl", "--out", "o", "--model", ckpt, "--lora-targets",
                              targets, "--freeze-projector", "--lora-r", "2"])
        return trainable.probe(s, ckpt)[1]
    every, one = trained("q_proj"), trained("language_model.model.layers.0.self_attn.q_proj")
    assert every > one > 0 and every % one == 0 and every // one > 1
    # inside the language model, as peft names it
    assert trained("model.layers.0.self_attn.q_proj") == one
    for outside in ("vision_tower.vision_model.encoder.layers.0.self_attn.q_proj",
                    "multi_modal_projector.linear_1"):
        with pytest.raises(ValueError, match="inside the language model only"):
            trained(outside)
    with pytest.raises(ValueError, match="no linear layer of the language model"):
        trained("qproj")


@pytest.mark.slow
@pytest.mark.parametrize("model, gpus, extra, fits, says", [
    # the defaults: batch 12
    ("pllava-7b", 1, [], True, "activation checkpointing on"),
    ("pllava-7b", 1, ["--activation-checkpointing", "off"], False, "--activation-checkpointing on"),
    # a release's hub id too
    ("ermu2001/pllava-13b", 8, ["--batch-size", "4"], True, "on 8 GPU(s)"),
    ("pllava-34b", 1, ["--batch-size", "4"], False, "more GPUs")])
def test_a_dry_run_plans_the_memory_of_each_gpu_before_anything_loads(
    model, gpus, extra, fits, says
):
    """batch 12 of 2,304 visual + 1,024 text tokens keeps far more than 80 GB of activations in 7B
    without checkpointing: auto turns it on; a run that fits in neither way is refused with the
    numbers, before any weight loads; a run that fits is rehearsed (one step on fake tensors, FSDP2
    over --gpus ranks), and the estimate holds within 10% of it."""
    r = run_tool("train.py",
                 ["--model", model, "--dry-run", "--card-gb", "80", "--gpus", str(gpus), *extra])
    assert (r.returncode == 0) == fits, r.stderr
    assert says in (r.stdout if fits else r.stderr), r.stdout + r.stderr
    if fits:
        estimate = float(re.search(r"total ([\d.]+) GB per GPU", r.stdout)[1])
        rehearsed = re.search(r"peak ([\d.]+) GB \+ context ([\d.]+) GB", r.stdout)
        assert abs(estimate - float(rehearsed[1]) - float(rehearsed[2])) < 0.1 * estimate, r.stdout


def test_a_dry_run_with_no_processes_is_one_line():
    r = run_tool("train.py", ["--model", "pllava-7b", "--dry-run"], env={"WORLD_SIZE": "0"})
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and "WORLD_SIZE" in r.stderr, (
        r.stderr
    )


def test_lora_flags_that_ask_for_another_adapter_than_the_models_own_are_refused_not_ignored(ckpt):
    """A model with an adapter (a release, an export) trains it on: no LoRA flag, or the same rank
    and layers, goes on with it; --lora-alpha sets its share; another rank or layer set is one line,
    not a silent no-op."""
    import lora
    from model import PLLaVA

    def go_on(*flags):
        model = PLLaVA.from_pretrained(ckpt)
        lora.add_lora(model.language_model, targets=("q_proj", "k_proj"), r=4, alpha=8.0)
        s = train.parse_args(["--data", "d.jsonl", "--out", "o", "--model", ckpt, *flags])
        trainable.add_lora(model, s)
        return lora.lora_shape(model.language_model)
    own = go_on()
    assert set(own.values()) == {(4, 8.0)}
    assert {n.rsplit(".", 1)[1] for n in own} == {"q_proj", "k_proj"}
    assert go_on("--lora-r", "4", "--lora-targets", "k_proj,q_proj") == own
    assert go_on("--lora-alpha", "32") == {n: (4, 32.0) for n in own}    # the report's share, set
    for flags, named in [(["--lora-r", "128"], "--lora-r"), (["--lora-targets", "q_proj,v_proj"],
                                                             "--lora-targets")]:
        with pytest.raises(ValueError, match=f"already has a LoRA adapter .*r 4 .*{named} ask"):
            go_on(*flags)
