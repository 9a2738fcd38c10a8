"""client.py, label.py and judge.py one fault at a time: a body cut anywhere, a stall, any shape of
answer, Retry-After, failures that repeat for every item, and a key that must never leak."""

import base64
import json
import os
import signal
import time
import urllib.parse

import pytest

from plumbing import client, redact
from plumbing.client import APIError, Client, parse_reply
from plumbing.jsonl import read_rows
from plumbing.redact import Redactor

from chaos_api import KEY, ChaosAPI, echoes
from tools import free_port, run_tool

ANSWER = "A red kite circles over a green hill."


@pytest.fixture
def key(monkeypatch):
    monkeypatch.setenv("TEST_KEY", KEY)


def one_item(*actions):
    """A server whose every request is the same item, answering with `actions` in turn, then
    well."""
    return ChaosAPI(lambda body, item: ANSWER, identify=lambda body: "x", script={"x": list(actions) + ["ok"] * 9})


def ask(api, **kw):
    c = Client(api.url, "m", "TEST_KEY", **{"timeout": 1.0, "retries": 3, "backoff": 0.01, **kw})
    return c.chat([{"role": "user", "content": "hi"}])


@pytest.mark.parametrize("fault", ["drop_in_headers", "drop_in_body", "drop_in_chunks", "bad_gzip", "html_200",
                                   "html_502", "e500_echo", "empty_choices", "no_choices", "choices_string",
                                   "content_number", "deep_json", "huge_html"])
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
    assert reply.content == ANSWER and reply.usage == {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
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


@pytest.mark.parametrize("after", ["3600", "Wed, 21 Oct 2099 07:28:00 GMT", "1e999", "nan", "-5", "soon"])
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
    ok = lambda message, **kw: {"choices": [{"message": message, "finish_reason": "stop"}], "usage": usage, **kw}
    assert parse_reply(ok({"content": "hi"})).content == "hi"
    assert parse_reply(ok("hi")).content == "hi"                                  # message a string
    assert parse_reply(ok({"content": [{"type": "text", "text": "h"}, "i", {"image": 1}]})).content == "hi"
    # null: an empty answer
    assert parse_reply(ok({"content": None})).content == ""
    assert parse_reply(ok({"content": 5})) is None and parse_reply(ok({"content": {"a": 1}})) is None
    assert parse_reply({"choices": [{"text": "legacy"}]}).content == "legacy"
    r = parse_reply({"choices": [{"message": {"content": "x"}, "finish_reason": 3}], "usage": None, "model": []})
    assert r.usage == {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
    assert r.finish_reason is None and r.model is None
    r = parse_reply(ok({"content": "x"}, usage={"prompt_tokens": "7", "completion_tokens": -1, "total_tokens": 1e400}))
    assert r.usage == {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
    for bad in ([], "x", None, {}, {"choices": []}, {"choices": None}, {"choices": ["x"]}, {"choices": [None]}):
        assert parse_reply(bad) is None


@pytest.mark.parametrize("value, seconds", [("2", 2.0), ("0", 0.0), ("3600", 300.0), ("1e999", 300.0),
                                            ("nan", None), ("-3", 0.0), ("soon", None), (None, None),
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
        assert not any(KEY[i:i + 8].lower() in text.lower() for i in range(len(KEY) - 7)), (form, text)
    assert scrub("a plain caption, 100% ok + fine") == "a plain caption, 100% ok + fine"
    # scrubbed first, cut after: a cut must not leave a piece of the key
    message = "x" * 290 + KEY + "y" * 10**6
    # and fast on a megabyte
    assert scrub(message, 300) == "x" * 290 + "***" + "y" * 7
    assert scrub.row({"video": "v.mp4", "a": [KEY, {"b": 1}]}) == {"video": "v.mp4", "a": ["***", {"b": 1}]}
    # a "key" too short to be a secret (a local server's EMPTY) changes nothing, not even "empty
    # room"
    for dummy in ("EMPTY", "x", "none"):
        text = "An empty room; the camera pans to an EMPTY chair. e.g. video"
        assert Redactor(dummy)(text) == text and Redactor(dummy).row({"video": "e.mp4"}) == {"video": "e.mp4"}


@pytest.mark.parametrize("value, ok", [(f"  {KEY}\n", True), (f"{KEY}\r", True), (f"{KEY[:10]}\n{KEY[10:]}", False),
                                       (f"{KEY[:10]} {KEY[10:]}", False), (f"{KEY}\x7f", False), (KEY + "é", False),
                                       ("", False)])
def test_a_key_with_stray_characters(monkeypatch, value, ok):
    monkeypatch.setenv("TEST_KEY", value)
    if ok:
        assert client.api_key("TEST_KEY") == KEY
    else:
        with pytest.raises(ValueError) as e:
            client.api_key("TEST_KEY")
        assert KEY[:8] not in str(e.value) and KEY[-8:] not in str(e.value) and "TEST_KEY" in str(e.value)


def run_api_tool(tool, args):
    return run_tool(tool, args, env={"DASHSCOPE_API_KEY": KEY, "OPENAI_API_KEY": KEY})


@pytest.fixture
def clips(tmp_path):
    from videos import write_video
    folder = tmp_path / "v"
    folder.mkdir()
    return [write_video(str(folder / f"c{i:02d}.mp4"), n_frames=4, size=(32, 24)) for i in range(12)], folder


@pytest.mark.slow
@pytest.mark.parametrize("fault, says", [("401", "refused the key in $DASHSCOPE_API_KEY"),
                                         ("quota", "no quota left")])
def test_a_refused_key_or_no_quota_stops_the_run_and_marks_nothing_done(tmp_path, clips, fault, says):
    videos, folder = clips
    counter = iter(range(10**6))
    api = ChaosAPI(lambda body, item: ANSWER, identify=lambda body: next(counter),
                   # the key stops working
                   script={i: ["ok"] if i < 3 else [fault] for i in range(10**3)})
    out = str(tmp_path / "labels.jsonl")
    try:
        r = run_api_tool("label.py", [str(folder), "--out", out, "--api-base", api.url, "--concurrency", "1",
                                  "--workers", "1"])
        sent = len(api.log)
    finally:
        api.close()
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 1 and lines[-1].startswith("error: ") and says in lines[-1] and "Traceback" not in r.stderr
    # stopped after the first failure, not 12
    assert sent <= 6
    rows = read_rows(out)
    assert sum("caption" in row for row in rows) == 3
    api = ChaosAPI(lambda body, item: ANSWER, identify=lambda body: "ok", script={"ok": ["ok"] * 100})
    try:
        again = run_api_tool("label.py", [str(folder), "--out", out, "--api-base", api.url])
    finally:
        api.close()
    assert again.returncode == 0 and len(api.log) == 9               # the failed ones were not done
    assert sorted(row["video"] for row in read_rows(out)) == sorted(videos)
    assert KEY not in open(out).read() + r.stderr + again.stderr


def test_an_unreachable_server_stops_the_run_after_a_few_items(tmp_path, clips):
    _, folder = clips
    out = str(tmp_path / "labels.jsonl")
    t0 = time.monotonic()
    r = run_api_tool("label.py", [str(folder), "--out", out, "--api-base", f"http://127.0.0.1:{free_port()}/v1",
                              "--concurrency", "2", "--retries", "1", "--backoff", "0.01", "--max-failures-in-a-row", "3"])
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 1 and "up and reachable" in lines[-1] and lines[-1].startswith("error: ")
    # 3 in a row, plus up to 2 x 2 in flight
    assert len(read_rows(out)) <= 7 and time.monotonic() - t0 < 60
    assert not any("caption" in row for row in read_rows(out))


def test_judge_stops_on_a_refused_key_and_keeps_what_was_paid_for(tmp_path):
    gt, pred = tmp_path / "gt.jsonl", tmp_path / "pred.jsonl"
    gt.write_text("".join(json.dumps({"video": f"v{i}", "caption": f"gt {i}"}) + "\n" for i in range(8)))
    pred.write_text("".join(json.dumps({"video": f"v{i}", "caption": f"pred {i}"}) + "\n" for i in range(8)))
    counter = iter(range(10**6))
    api = ChaosAPI(lambda body, item: json.dumps({"score": 3, "correct": True, "reason": "r"}),
                   identify=lambda body: next(counter), script={i: ["ok"] if i < 4 else ["401"] for i in range(100)})
    try:
        r = run_api_tool("judge.py",
                         ["--gt", str(gt), "--pred", str(pred), "--out", str(tmp_path / "rep"),
                          "--api-base", api.url, "--concurrency", "1"])
    finally:
        api.close()
    assert r.returncode == 1 and "refused the key in $OPENAI_API_KEY" in r.stderr.splitlines()[-1]
    cache = read_rows(str(tmp_path / "rep" / "judgments.jsonl"))
    assert sum("score" in row for row in cache) == 4 and not (tmp_path / "rep" / "summary.json").exists()
    assert KEY not in (tmp_path / "rep" / "judgments.jsonl").read_text() + r.stderr


def test_an_unexpected_exception_is_that_items_row(tmp_path):
    """Whatever a job's work raises, anywhere in it, is that job's row (not done); the others go
    on."""
    import label
    from plumbing.jsonl import Appender, read_rows
    from plumbing.runner import run_items

    class Broken:
        scrub, stop = Redactor(""), __import__("threading").Event()

        def chat(self, *a, **kw):
            raise KeyError("a bug in a reply handler")

    class Args:
        max_new_tokens, temperature, frames_as = 10, None, "video"
    from plumbing.sources import Video
    jobs = [((Video("v.mp4", "v.mp4"), None, None), ["data:image/jpeg;base64,AA=="]),
            ((Video("w.mp4", "w.mp4"), (1, 3, 2.0, 4.0), None), ["x"])]
    with Appender(str(tmp_path / "out.jsonl")) as out:
        run_items(Broken(), jobs, lambda job: label.label_one(Broken(), Args, "prompt", {}, "s", job), 2, out, 10,
                  label.identify)
    rows = sorted(read_rows(str(tmp_path / "out.jsonl")), key=lambda r: r["video"])
    assert rows[0]["code"] == "internal_error" and "KeyError" in rows[0]["error"] and not label.is_done(rows[0])
    assert rows[1]["code"] == "internal_error" and rows[1]["shot"] == 1 and rows[1]["start"] == 2.0


def slow_api():
    """A teacher that answers every request a second after it comes."""
    return ChaosAPI(lambda body, item: ANSWER, identify=lambda body: "x",
                    script={"x": [("slow_ok", 1.0)] * 100})


def three_in_flight(folder, out, api):
    """label.py started, once three of its requests are in flight."""
    proc = run_tool("label.py", [folder, "--out", out, "--api-base", api.url, "--concurrency", "3",
                                 "--timeout", "60"], env={"DASHSCOPE_API_KEY": KEY}, wait=False)
    while len(api.log) < 3:
        time.sleep(0.01)
    return proc


@pytest.mark.slow
def test_ctrl_c_writes_the_answers_in_flight_and_a_second_abandons_them(tmp_path, clips):
    _, folder = clips
    out = str(tmp_path / "labels.jsonl")
    api = slow_api()
    try:
        proc = three_in_flight(folder, out, api)
        proc.send_signal(signal.SIGINT)
        t0 = time.monotonic()
        _, err = proc.communicate(timeout=60)
        asked = len(api.log)
        slow = run_tool("label.py",
                        [folder, "--out", out, "--api-base", api.url, "--concurrency", "3",
                         "--timeout", "60"], env={"DASHSCOPE_API_KEY": KEY}, wait=False)
        while len(api.log) < asked + 3:
            time.sleep(0.01)
        slow.send_signal(signal.SIGINT)
        time.sleep(0.2)
        slow.send_signal(signal.SIGINT)   # the second: do not wait for them
        t1 = time.monotonic()
        _, err2 = slow.communicate(timeout=60)
    finally:
        api.close()
    assert time.monotonic() - t0 < 30 and t1 - t0 > 0 and "Traceback" not in err + err2, err + err2
    assert proc.returncode != 0 and err.strip().splitlines()[-1] == "interrupted"
    # no new request; the paid answers kept
    assert asked == 3 and len(read_rows(out)) >= 3
    assert slow.returncode != 0 and time.monotonic() - t1 < 5


def test_judge_writes_no_key_in_any_report_file(tmp_path):
    gt, pred = tmp_path / "gt.jsonl", tmp_path / "pred.jsonl"
    gt.write_text(json.dumps({"video": "v", "caption": "gt"}) + "\n")
    pred.write_text(json.dumps({"video": "v", "caption": "pred"}) + "\n")
    api = ChaosAPI(lambda body, item: json.dumps({"score": 3, "correct": True,
                                                  "reason": f"signed {KEY}"}),
                   identify=lambda body: "x", script={"x": ["ok"] * 9})
    try:
        r = run_api_tool("judge.py", ["--gt", gt, "--pred", pred, "--out", tmp_path / "rep", "--api-base", api.url])
    finally:
        api.close()
    assert r.returncode == 0, r.stderr
    for name in os.listdir(tmp_path / "rep"):
        assert KEY[:10] not in (tmp_path / "rep" / name).read_text(), name


@pytest.mark.slow
def test_refusals_before_any_answer_stop_the_run_but_are_never_paid_for_twice(tmp_path):
    from videos import solid_videos
    order, _ = solid_videos(str(tmp_path / "v"), 12, n_frames=4, size=(32, 24))
    out = str(tmp_path / "labels.jsonl")
    # a video is known by its frames (one colour each): the first 4 asked are refused
    first_seen = {}
    api = ChaosAPI(lambda body, item: ANSWER,
                   identify=lambda body: first_seen.setdefault(json.dumps(body["messages"][0]["content"][0]),
                                                               len(first_seen)),
                   script={i: ["moderated" if i < 4 else "ok"] * 3 for i in range(12)})
    args = [str(tmp_path / "v"), "--out", out, "--api-base", api.url, "--max-failures-in-a-row",
            "4", "--concurrency", "1"]
    try:
        first = run_api_tool("label.py", args)
        calls, written = [(e["item"], e["action"]) for e in api.log], len(read_rows(out))
        second = run_api_tool("label.py", args)
    finally:
        api.close()
    said = first.stderr.strip().splitlines()[-1]
    assert first.returncode == 1 and "were all refused" in said and "--retry-errors" in said, (calls, first.stderr)
    assert "--max-failures-in-a-row" in said
    # the refusals written (and an answer in flight)
    assert len(calls) in (4, 5) and written == len(calls), calls
    # each asked once
    assert second.returncode == 0 and len(api.log) == len(order), (api.log, second.stderr)
    rows = read_rows(out)
    assert sum("caption" in r for r in rows) == len(order) - 4 and len({r["name"] for r in rows}) == len(order)


def test_the_first_answer_after_an_outage_wakes_every_retry_waiting_out_its_backoff(monkeypatch):
    """Threads backing off from a server that was down (no HTTP status) retry as soon as any request
    is answered, not a minute later; those backing off from a 5xx keep their backoff."""
    import threading
    from plumbing.client import Client
    monkeypatch.setenv("TEST_KEY", KEY)
    client = Client("http://127.0.0.1:9/v1", "m", "TEST_KEY")
    woken = []
    waiters = [threading.Thread(target=lambda down=down: (client._back_off(60, down), woken.append(down)))
               for down in (True, True, False)]
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


@pytest.mark.slow
def test_sigterm_is_a_first_ctrl_c(tmp_path, clips):
    _, folder = clips
    out = str(tmp_path / "labels.jsonl")
    api = slow_api()
    try:
        proc = three_in_flight(folder, out, api)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        api.close()
    # paid for, written; no new request
    assert len(api.log) == 3 and len(read_rows(out)) == 3, err
    assert not os.path.exists(out + ".lock") and "labelled 3" in err and "Traceback" not in err
    assert err.strip().splitlines()[-1] == "interrupted"


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
