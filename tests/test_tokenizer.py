"""tokenizer.py gives transformers' LlamaTokenizer's ids from the same files; prompts and loss
masks."""

import pytest

from tokenizer import (
    QUESTION,
    SYSTEM,
    TEMPLATES,
    Tokenizer,
    prompt_ids,
    stop_id,
    template_for,
    training_ids,
)

from helpers import make_tokenizer

TEXTS = ["hello world", " leading space", "two  spaces and\n\nnewlines\n",
         "ünïcödé → 表情 🙂 bytes", "x</s>ASSISTANT: hi</s>", "<image>\nhello",
         "USER: <image>\n USER: describe the video ASSISTANT:", "<image>", "", "trailing space ",
         "\n starts with a newline", "<pad><pad>text", "12345 digits 2024"]


@pytest.fixture(scope="module", params=[("vicuna", False), ("vicuna", True), ("chatml", False)],
                ids=["vicuna", "vicuna-legacy", "chatml-yi"])
def pair(request, tmp_path_factory):
    from transformers import AutoTokenizer
    kind, legacy = request.param
    folder = make_tokenizer(str(tmp_path_factory.mktemp(kind)), kind, legacy)
    return kind, Tokenizer(folder), AutoTokenizer.from_pretrained(folder)


def prompts(kind):
    t = TEMPLATES[template_for_kind(kind)]
    first = t["first"].replace("{system}", SYSTEM).replace("{question}", QUESTION)
    return [first,
            first + t["answer"].replace("{answer}", "The video shows a red circle.") + t["end"],
            first + " a" + t["end"] + t["turn"].replace("{question}", "and then?")]


def template_for_kind(kind):
    return "chatml" if kind == "chatml" else "vicuna"


def test_ids_equal_transformers(pair):
    kind, ours, ref = pair
    for text in TEXTS + prompts(kind):
        assert ours.encode(text) == ref(text).input_ids, repr(text)


def test_decode_equals_transformers_and_strips_special_tokens(pair):
    kind, ours, ref = pair
    for text in TEXTS + prompts(kind):
        ids = ref(text).input_ids
        assert ours.decode(ids) == ref.decode(ids, skip_special_tokens=True), repr(text)
        assert ours.decode(ids, skip_special=False) == ref.decode(ids, skip_special_tokens=False), (
            repr(text)
        )


def test_image_is_inserted_by_id_once(pair):
    kind, ours, _ = pair
    template = template_for(ours)
    assert template == template_for_kind(kind)
    ids = prompt_ids(ours, "what happens?", template)
    assert ids.count(ours.image_id) == 1 and ours.image_id == 400
    assert ours.decode(ids).count("<image>") == 0


def test_training_labels_cover_only_the_answers(pair):
    kind, ours, _ = pair
    template = template_for_kind(kind)
    ids, labels = training_ids(
        ours, [("what is it?", "a red circle"), ("and then?", "it moves left")], template
    )
    assert len(ids) == len(labels)
    first = prompt_ids(ours, "what is it?", template)
    assert ids[:len(first)] == first and set(labels[:len(first)]) == {-100}
    answers = [i for i, l in zip(ids, labels) if l != -100]
    assert [l for l in labels if l != -100] == answers
    # each answer ends with the stop token
    assert answers.count(stop_id(ours, template)) == 2
    text = ours.decode([a for a in answers if a != stop_id(ours, template)])
    assert "a red circle" in text and "it moves left" in text and "what is it" not in text
    # changing the prompt changes no label
    ids2, labels2 = training_ids(
        ours, [("WHAT IS THIS THING?", "a red circle"), ("and then?", "it moves left")], template
    )
    assert [l for l in labels2 if l != -100] == [l for l in labels if l != -100]
