"""Text in and out: SentencePiece ids equal to transformers' LlamaTokenizer, and the prompt
templates.

transformers builds its LlamaTokenizer from the same tokenizer.model, but treats spaces its own way
(a Metaspace pre-tokenizer, no normalizer): text is split on the added tokens (<image>, </s>,
ChatML's <|im_start|> ...), the first piece of text gets a leading "▁" unless it starts with a
space, the pieces after a special token get none (unless the config says `legacy`), and whitespace
is never collapsed. SentencePiece's own normalizer does other things (a dummy prefix on every call,
say), so we switch it off in the model and add the prefix ourselves. <image> is always inserted by
id, never spelled out.
"""

import json
import os
import re

import sentencepiece as spm

from plumbing.jsonl import read_json

IMAGE = "<image>"
# The system line of PLLaVA's evaluations (Video-ChatGPT's): what its released models were tested
# with.
SYSTEM = ("You are Video-ChatGPT, a large vision-language assistant. You are able to understand "
          "the video content that the user provides, and assist the user with a variety of tasks "
          "using natural language.Follow the instructions carefully and explain your answers in "
          "detail based on the provided video.")
QUESTION = ("Describe this video in detail: the setting, the characters and objects, what they "
            "do, and how the scene changes from beginning to end. Mention only what you can see.")
TEMPLATES = {
    # PLLaVA's Vicuna prompt: roles "USER: " / "ASSISTANT:", turns apart by " ", answers end </s>
    "vicuna": dict(first="{system} USER: <image>\n USER: {question} ASSISTANT:",
                   turn="USER: {question} ASSISTANT:", answer=" {answer}", end="</s>"),
    # ChatML (Yi-34B / pllava-34b); <|im_end|> ends an answer and is the stop token
    "chatml": dict(first="<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n<image>\n"
                         "{question}<|im_end|>\n<|im_start|>assistant\n",
                   turn="\n<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n",
                   answer="{answer}", end="<|im_end|>"),
}


def _varint(buf, i):
    value = shift = 0
    while True:
        b = buf[i]
        i += 1
        value |= (b & 0x7F) << shift
        shift += 7
        if b < 0x80:
            return value, i


def _fields(buf):
    """(field number, wire type, field start, payload start, field end) for each field of a
    protobuf message."""
    i = 0
    while i < len(buf):
        begin = i
        key, i = _varint(buf, i)
        wire, start = key & 7, i
        if wire == 0:
            _, i = _varint(buf, i)
        elif wire == 2:
            n, start = _varint(buf, i)
            i = start + n
        else:
            i += {1: 8, 5: 4}[wire]
        yield key >> 3, wire, begin, start, i


def _length_delimited(field, payload: bytes) -> bytes:
    n, size = len(payload), bytearray()
    while True:
        size.append((n & 0x7F) | (0x80 if n > 0x7F else 0))
        n >>= 7
        if not n:
            break
    return bytes([field << 3 | 2]) + bytes(size) + payload


def plain_normalizer(model: bytes) -> bytes:
    """tokenizer.model with its NormalizerSpec (ModelProto field 3) set to what transformers does:
    rule "identity" (1, and no charsmap, 2), no dummy prefix (3), whitespace kept (4).
    SentencePiece's Python API cannot change these, and protobuf is not a dependency, so the bytes
    are edited directly."""
    spec = _length_delimited(1, b"identity") + b"\x18\x00\x20\x00"
    out = bytearray()
    for field, wire, begin, start, end in _fields(model):
        if field == 3 and wire == 2:   # keep the spec's other fields, replace these four
            old = model[start:end]
            kept = (old[b:e] for f, _, b, _, e in _fields(old) if f not in (1, 2, 3, 4))
            spec = b"".join(kept) + spec
        else:
            out += model[begin:end]
    return bytes(out + _length_delimited(3, spec))


def _content(token):
    return token["content"] if isinstance(token, dict) else token


class Tokenizer:
    def __init__(self, folder: str):
        model = os.path.join(folder, "tokenizer.model")
        if not os.path.isfile(model):
            raise FileNotFoundError(f"{folder}: no tokenizer.model")
        try:
            self._load(folder, model)
        except (RuntimeError, KeyError, IndexError, TypeError, AttributeError, ValueError) as e:
            raise ValueError(f"{folder}: the tokenizer files are broken or not SentencePiece's "
                             f"({type(e).__name__}: {str(e)[:200]})") from None

    def _load(self, folder, model):
        with open(model, "rb") as f:
            self.sp = spm.SentencePieceProcessor(model_proto=plain_normalizer(f.read()))
        if self.sp.get_piece_size() == 0:
            raise ValueError("no pieces")
        config = read_json(os.path.join(folder, "tokenizer_config.json"))
        config = {**read_json(os.path.join(folder, "special_tokens_map.json")), **config}
        self.add_bos = config.get("add_bos_token", True)
        self.legacy = bool(config.get("legacy", False))
        self.prefix_space = config.get("add_prefix_space") is not False
        # added tokens: {text: id}; "special" ones are dropped when decoding. Like transformers,
        # count the model's own control pieces (<s>, </s>, ChatML's <|im_start|> in Yi) among them.
        self.added = {self.sp.id_to_piece(i): i for i in range(self.sp.get_piece_size())
                      if self.sp.is_control(i) or self.sp.is_unknown(i)}
        special = set(self.added.values())
        for i, t in config.get("added_tokens_decoder", {}).items():
            self.added[t["content"]] = int(i)
            if t.get("special", True):
                special.add(int(i))
        for text, i in read_json(os.path.join(folder, "added_tokens.json")).items():
            self.added.setdefault(text, i)
            special.add(i)
        kinds = ("bos_token", "eos_token", "unk_token", "pad_token")
        names = {k: _content(config[k]) for k in kinds if config.get(k)}
        for text in names.values():
            if text not in self.added and self._piece_id(text) is not None:
                self.added[text] = self._piece_id(text)
        self.special_ids = special | {self.added[t] for t in names.values() if t in self.added}
        self.bos_id = self.added.get(names.get("bos_token"), self.sp.bos_id())
        self.eos_id = self.added.get(names.get("eos_token"), self.sp.eos_id())
        self.pad_id = self.added.get(names.get("pad_token"))
        self.image_id = self.added.get(IMAGE)
        self._id_to_added = {i: t for t, i in self.added.items()}
        longest_first = sorted(self.added, key=len, reverse=True)
        pattern = "(" + "|".join(map(re.escape, longest_first)) + ")"
        self._split = re.compile(pattern) if self.added else None

    def _piece_id(self, piece):
        i = self.sp.piece_to_id(piece)
        return i if self.sp.id_to_piece(i) == piece else None

    def __len__(self):
        return max(self.sp.get_piece_size(), max(self.added.values(), default=-1) + 1)

    def encode_text(self, text: str, at_start: bool) -> list:
        """Ids of plain text (no added tokens inside); at_start: does it begin the whole string?"""
        if not text:
            return []
        if self.prefix_space and (at_start or self.legacy) and not text.startswith(" "):
            text = " " + text
        return self.sp.encode(text)

    def encode(self, text: str, bos: bool = None, literal=()) -> list:
        """Ids of text, the added tokens spelled in it (<image>, </s>, ChatML's) as their ids,
        except inside the `literal` (start, end) spans: text from a data row or a flag, never read
        as a control token."""
        ids = [self.bos_id] if (self.add_bos if bos is None else bos) else []
        start = 0
        for m in self._split.finditer(text) if self._split else ():
            if any(a < m.end() and m.start() < b for a, b in literal):
                continue
            ids += self.encode_text(text[start:m.start()], at_start=start == 0)
            ids.append(self.added[m.group()])
            start = m.end()
        return ids + self.encode_text(text[start:], at_start=start == 0)

    def decode(self, ids, skip_special: bool = True) -> str:
        out, run, size = [], [], self.sp.get_piece_size()
        for i in list(ids) + [None]:
            if i is not None and i not in self._id_to_added:
                if 0 <= i < size:   # ids past the tokenizer (a vocabulary padded to 32064) go
                    run.append(i)
                continue
            if run:
                out.append(self.sp.decode(run))
                run = []
            if i is not None and not (skip_special and i in self.special_ids):
                out.append(self._id_to_added[i])
        text = "".join(out)
        return text[1:] if self.prefix_space and text.startswith(" ") else text


def template_for(tok: Tokenizer) -> str:
    return "chatml" if "<|im_start|>" in tok.added else "vicuna"


def prompt_ids(tok: Tokenizer, question: str = QUESTION, template: str = "vicuna",
               system: str = SYSTEM) -> list:
    """The ids of a captioning prompt: the model's answer starts right after them."""
    text, literal = fill(TEMPLATES[template]["first"], system=system, question=question)
    return tok.encode(text, literal=literal)


def fill(template: str, **values) -> tuple:
    """The template with each {name} replaced by values[name], and the (start, end) spans of those
    values: what a user wrote is encoded as plain text (Tokenizer.encode's literal), a "<image>" in
    it included."""
    text, spans, i = "", [], 0
    for m in re.finditer(r"\{(\w+)\}", template):
        text += template[i:m.start()]
        spans.append((len(text), len(text) + len(values[m.group(1)])))
        text += values[m.group(1)]
        i = m.end()
    return text + template[i:], spans


PROMPT_FILE = "prompt.json"   # in a model folder train.py exported: the prompt it was trained with


def save_prompt(folder: str, question: str, system: str, template: str):
    with open(os.path.join(folder, PROMPT_FILE), "w", encoding="utf-8") as f:
        json.dump({"question": question, "system": system, "template": template}, f, indent=2,
                  ensure_ascii=False)


def load_prompt(folder: str) -> dict:
    """The folder's prompt.json ({"question", "system", "template"}, each a string), {} when it has
    none."""
    path = os.path.join(folder, PROMPT_FILE)
    if not os.path.exists(path):
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            got = json.load(f)
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not JSON ({e})") from None
    keys = ("question", "system", "template")
    if not isinstance(got, dict) or not all(isinstance(got.get(k, ""), str) for k in keys) \
            or got.get("template", "vicuna") not in TEMPLATES:
        raise ValueError(f"{path}: expected {{\"question\", \"system\", \"template\" "
                         f"({' or '.join(TEMPLATES)})}} as strings")
    return {k: got[k] for k in ("question", "system", "template") if k in got}


def prompt_for(folder: str, tok: Tokenizer, question: str = None, system: str = None,
               template: str = None) -> dict:
    """The prompt a model is asked with (question, system, template): each from its flag when
    given, else from the model folder's prompt.json (what the model was trained with), else
    PLLaVA's; "source" says where the question came from (captioning and training both take it from
    here)."""
    saved = load_prompt(folder) if folder else {}
    saved_file = os.path.join(folder, PROMPT_FILE) if folder else None
    source = "--prompt" if question else saved_file if "question" in saved else \
        "PLLaVA's detailed-caption question"
    return {"question": question or saved.get("question", QUESTION),
            "system": system or saved.get("system", SYSTEM),
            "template": template or saved.get("template") or template_for(tok), "source": source}


def stop_id(tok: Tokenizer, template: str) -> int:
    return tok.added.get(TEMPLATES[template]["end"], tok.eos_id)


def training_ids(tok: Tokenizer, turns, template: str = "vicuna", system: str = SYSTEM):
    """A training sample from [(question, answer), ...]: (ids, labels), the labels -100 on every
    prompt token so that the loss falls on the answers (and on each answer's end token) only. The
    first turn is exactly prompt_ids(), so a model trained on these sees at inference what it was
    trained on."""
    t = TEMPLATES[template]
    ids, labels = [], []
    for k, (question, answer) in enumerate(turns):
        text, literal = fill(t["turn"], question=question)
        prompt = prompt_ids(tok, question, template, system) if k == 0 else \
            tok.encode(text, False, literal)
        answer = t["answer"].replace("{answer}", answer.strip())
        reply = tok.encode_text(answer, at_start=False) + [stop_id(tok, template)]
        ids += prompt + reply
        labels += [-100] * len(prompt) + reply
    return ids, labels


def train_tokenizer(folder: str, texts, vocab_size: int, chatml: bool = False,
                    legacy: bool = False) -> str:
    """Train a SentencePiece BPE model on `texts` and write the tokenizer files of a Vicuna (LLaMA)
    or a ChatML (Yi) checkpoint beside it, <image> and <pad> added after the vocabulary as llava-hf
    does: for models trained from scratch (toy.py) and for tests."""
    import tempfile
    os.makedirs(folder, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        corpus = os.path.join(tmp, "corpus.txt")
        with open(corpus, "w", encoding="utf-8") as f:
            f.write("\n".join(texts))
        spm.SentencePieceTrainer.train(
            input=corpus, model_prefix=os.path.join(tmp, "tokenizer"), vocab_size=vocab_size,
            model_type="bpe", byte_fallback=True, character_coverage=1.0, unk_id=0, bos_id=1,
            eos_id=2, pad_id=-1, minloglevel=3,
            split_digits=True, remove_extra_whitespaces=False, normalization_rule_name="identity",
            allow_whitespace_only_pieces=True, add_dummy_prefix=not chatml, hard_vocab_limit=False,
            bos_piece="<|startoftext|>" if chatml else "<s>",
            eos_piece="<|endoftext|>" if chatml else "</s>",
            control_symbols=["<|im_start|>", "<|im_end|>"] if chatml else [])
        os.replace(os.path.join(tmp, "tokenizer.model"), os.path.join(folder, "tokenizer.model"))
    model = os.path.join(folder, "tokenizer.model")
    size = spm.SentencePieceProcessor(model_file=model).get_piece_size()

    def added(content):
        return {"content": content, "special": True, "lstrip": False, "rstrip": False,
                "normalized": False,
                "single_word": False}
    tokens = [(0, "<unk>"), (1, "<|startoftext|>" if chatml else "<s>"),
              (2, "<|endoftext|>" if chatml else "</s>")]
    tokens += [(3, "<|im_start|>"), (4, "<|im_end|>")] if chatml else []
    tokens += [(size, IMAGE), (size + 1, "<pad>")]
    config = {"tokenizer_class": "LlamaTokenizer", "legacy": legacy, "add_bos_token": not chatml,
              "add_eos_token": False, "bos_token": tokens[1][1],
              "eos_token": "<|im_end|>" if chatml else "</s>", "unk_token": "<unk>",
              "pad_token": "<pad>", "added_tokens_decoder": {str(i): added(c) for i, c in tokens}}
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump(config, f, indent=2)
    with open(os.path.join(folder, "added_tokens.json"), "w") as f:
        json.dump({IMAGE: size, "<pad>": size + 1}, f)
    return folder
