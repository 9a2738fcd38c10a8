"""plumbing/client.py one fault at a time: a body cut anywhere, a stall, any shape of answer,
Retry-After, a server that comes back, and a key that must never leak, in any form."""

import base64
import json
import time
import urllib.parse

import pytest

from plumbing import client, redact
from plumbing.client import APIError, Client, parse_reply
from plumbing.redact import Redactor

from chaos_api import KEY, ChaosAPI, echoes

ANSWER = "A red kite circles over a green hill."


@pytest.fixture
def key(monkeypatch):
    monkeypatch.setenv("TEST_KEY", KEY)


def one_item(*actions):
    """A server whose every request is the same item, answering with `actions` in turn, then
    well."""
    return ChaosAPI(lambda body, item: ANSWER, identify=lambda body: "x",
                    script={"x": list(actions) + ["ok"] * 9})


def ask(api, **kw):
    c = Client(api.url, "m", "TEST_KEY", **{"timeout": 1.0, "retries": 3, "backoff": 0.01, **kw})
    return c.chat([{"role": "user", "content": "hi"}])


@pytest.mark.parametrize("fault",
                         ["drop_in_headers", "drop_in_body", "drop_in_chunks", "bad_gzip",
                          "html_200", "html_502", "e500_echo", "empty_choices", "no_choices",
                          "choices_string", "content_number", "deep_json", "huge_html"])
def test_a_broken_answer_is_asked_again(key, fault):
    api = one_item(fault, fault)
    t0 = time.monotonic()
    try:
        reply = ask(api)
    finally:
        api.close()
    assert reply.content == ANSWER and [e["action"] for e in api.log] == [fault, fault, "ok"]
    assert time.monotonic() - t0 < 5   # 8 MB of HTML is not scrubbed whole before it is cut


def test_an_answer_with_absurd_usage_is_still_the_answer(key):
    api = one_item("ok_usage_huge")
    try:
        reply = ask(api)
    finally:
        api.close()
    assert reply.content == ANSWER and reply.usage == {"prompt_tokens": 0, "completion_tokens": 0,
                                                       "total_tokens": 0}
    assert len(api.log) == 1


@pytest.mark.parametrize("fault", ["stall", "trickle"])
def test_the_timeout_is_a_deadline_for_the_whole_request(key, fault):
    api = one_item(fault)   # headers at once, then nothing, or a byte every 0.1 s for 4 s
    t0 = time.monotonic()
    try:
        with pytest.raises(APIError, match="within 1 s"):
            ask(api, retries=0)
    finally:
        api.close()
    # without the deadline: 4 s; the margin is for a loaded machine (1.6 s failed beside 3 toy runs)
    assert time.monotonic() - t0 < 3.0 and api.log[0]["held"] < 3.0


@pytest.mark.parametrize("after",
                         ["3600", "Wed, 21 Oct 2099 07:28:00 GMT", "1e999", "nan", "-5", "soon"])
def test_retry_after_is_honoured_up_to_a_cap(key, after):
    api = one_item(("r429_long", after))
    try:
        reply = ask(api, max_retry_after=0.5)
    finally:
        api.close()
    gap = api.log[1]["t"] - api.log[0]["t"]
    assert reply.content == ANSWER and gap < 1.5
    if after in ("3600", "1e999") or "2099" in after:
        assert gap >= 0.45   # honoured, up to the cap


def test_reply_shapes():
    usage = {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}
    ok = lambda message, **kw: {"choices": [{"message": message, "finish_reason": "stop"}],
                                "usage": usage, **kw}
    assert parse_reply(ok({"content": "hi"})).content == "hi"
    assert parse_reply(ok("hi")).content == "hi"                                  # message a string
    assert parse_reply(ok({"content": [{"type": "text", "text": "h"}, "i",
                                       {"image": 1}]})).content == "hi"
    # null: an empty answer
    assert parse_reply(ok({"content": None})).content == ""
    assert parse_reply(ok({"content": 5})) is None
    assert parse_reply(ok({"content": {"a": 1}})) is None
    assert parse_reply({"choices": [{"text": "legacy"}]}).content == "legacy"
    r = parse_reply({"choices": [{"message": {"content": "x"}, "finish_reason": 3}], "usage": None,
                     "model": []})
    assert r.usage == {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
    assert r.finish_reason is None and r.model is None
    r = parse_reply(ok({"content": "x"},
                       usage={"prompt_tokens": "7", "completion_tokens": -1,
                              "total_tokens": 1e400}))
    assert r.usage == {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
    for bad in ([], "x", None, {}, {"choices": []}, {"choices": None}, {"choices": ["x"]},
                {"choices": [None]}):
        assert parse_reply(bad) is None


@pytest.mark.parametrize("value, seconds",
                         [("2", 2.0), ("0", 0.0), ("3600", 300.0), ("1e999", 300.0), ("nan", None),
                          ("-3", 0.0), ("soon", None), (None, None),
                          ("Wed, 21 Oct 2099 07:28:00 GMT", 300.0)])
def test_retry_after_values(value, seconds):
    assert client.retry_after(value, cap=300.0) == seconds


def test_the_key_is_scrubbed_in_every_form_and_cut():
    scrub = Redactor(KEY)
    entities = "".join(f"&#{ord(c)};" for c in KEY)
    for form in echoes(KEY) + [json.dumps(KEY), KEY.encode().hex(), urllib.parse.quote_plus(KEY),
                               base64.urlsafe_b64encode(KEY.encode()).decode(), KEY[7:22],
                               # escapes in escapes
                               urllib.parse.quote(urllib.parse.quote(KEY, safe=""), safe=""),
                               urllib.parse.quote(entities, safe=""), json.dumps(entities)[1:-1]]:
        text = scrub(f"error: the key {form} is not valid")
        assert text.startswith("error: the key ") and text.endswith(" is not valid")
        pieces = (KEY[i:i + 8].lower() for i in range(len(KEY) - 7))
        assert not any(piece in text.lower() for piece in pieces), (form, text)
    assert scrub("a plain caption, 100% ok + fine") == "a plain caption, 100% ok + fine"
    # scrubbed first, cut after: a cut must not leave a piece of the key
    message = "x" * 290 + KEY + "y" * 10**6
    # and fast on a megabyte
    assert scrub(message, 300) == "x" * 290 + "***" + "y" * 7
    assert scrub.row({"video": "v.mp4", "a": [KEY, {"b": 1}]}) == {"video": "v.mp4",
                                                                   "a": ["***", {"b": 1}]}
    # a "key" too short to be a secret (a local server's EMPTY) changes nothing, not even "empty
    # room"
    for dummy in ("EMPTY", "x", "none"):
        text = "An empty room; the camera pans to an EMPTY chair. e.g. video"
        assert Redactor(dummy)(text) == text
        assert Redactor(dummy).row({"video": "e.mp4"}) == {"video": "e.mp4"}


@pytest.mark.parametrize("value, ok",
                         [(f"  {KEY}\n", True), (f"{KEY}\r", True),
                          (f"{KEY[:10]}\n{KEY[10:]}", False), (f"{KEY[:10]} {KEY[10:]}", False),
                          (f"{KEY}\x7f", False), (KEY + "é", False), ("", False)])
def test_a_key_with_stray_characters(monkeypatch, value, ok):
    monkeypatch.setenv("TEST_KEY", value)
    if ok:
        assert client.api_key("TEST_KEY") == KEY
    else:
        with pytest.raises(ValueError) as e:
            client.api_key("TEST_KEY")
        said = str(e.value)
        assert KEY[:8] not in said and KEY[-8:] not in said and "TEST_KEY" in said


def test_the_first_answer_after_an_outage_wakes_every_retry_waiting_out_its_backoff(monkeypatch):
    """Threads backing off from a server that was down (no HTTP status) retry as soon as any request
    is answered, not a minute later; those backing off from a 5xx keep their backoff."""
    import threading
    from plumbing.client import Client
    monkeypatch.setenv("TEST_KEY", KEY)
    client = Client("http://127.0.0.1:9/v1", "m", "TEST_KEY")
    woken = []
    def wait(down):
        client._back_off(60, down)
        woken.append(down)
    waiters = [threading.Thread(target=wait, args=(down,)) for down in (True, True, False)]
    for w in waiters:
        w.start()
    time.sleep(0.3)
    with client.answered:                       # what chat() does with an answer
        client.answers += 1
        client.answered.notify_all()
    for w in waiters[:2]:
        w.join(timeout=10)
    assert woken.count(True) == 2 and False not in woken
    client.stop.set()                           # the run stops: the last one ends its wait too
    waiters[2].join(timeout=10)
    assert woken.count(False) == 1


def test_scrubbing_a_10_mb_answer_decodes_each_escape_kind_a_bounded_number_of_times(monkeypatch):
    """Linear in the length whatever the text holds: each decoder runs at most 3 times over it, and
    the exact-piece regex only near what the needles found (here nothing)."""
    words = ["rock&amp;roll", "100%", "a+b", "the", "%20", "x&#32;y", "12345", "plain"]
    text = " ".join(words[i % len(words)] for i in range(1_300_000))[:10_000_000]
    calls, masks = [], []
    monkeypatch.setattr(redact, "DECODERS", tuple(
        (lambda f: lambda t: calls.append(f.__name__) or f(t))(f) for f in redact.DECODERS))
    real = Redactor._mask
    monkeypatch.setattr(Redactor, "_mask", lambda self, t: masks.append(len(t)) or real(self, t))
    out = Redactor(KEY)(text + " " + KEY)
    assert out == text + " ***" and len(calls) <= 9 and len(masks) <= 2, (calls, masks)
