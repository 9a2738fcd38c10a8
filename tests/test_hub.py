"""hub.py against a hub that cuts, corrupts, changes files under us, omits lengths and names files
outside the folder; and four processes resolving one model at once."""

import collections
import hashlib
import http.server
import json
import os
import sys
import threading
import time

import pytest

from plumbing import hub

from tools import ROOT, run_command

REPO = "someone/tiny"


class Hub(http.server.BaseHTTPRequestHandler):
    """Serves files[name] at /someone/tiny/resolve/main/name, with the faults the test sets."""
    protocol_version = "HTTP/1.1"
    files, log, faults = {}, [], {}

    def log_message(self, *a):
        pass

    def do_GET(self):
        name = self.path.split("/resolve/main/", 1)[1]
        fault = self.faults.get(name, {})
        self.log.append((name, self.headers.get("Range"), self.headers.get("If-Range")))
        if name not in self.files:
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        data = self.files[name]
        if fault.get("portal"):
            data = b"<!DOCTYPE html><html><body>Please sign in to the hotel wifi</body></html>"
        data = fault.get("body", data)
        etag = '"' + hashlib.sha256(data).hexdigest() + '"'
        start = (
            int(self.headers["Range"].split("=")[1].rstrip("-")) if self.headers.get("Range") else 0
        )
        if (
            start
            and fault.get("if_range", True)
            and self.headers.get("If-Range") not in (None, etag)
        ):
            start = 0   # the file changed: If-Range says send it whole
        body = data[start:]
        if fault.get("endless"):
            self.send_response(200)
            if fault["endless"] == "announced":
                self.send_header("X-Linked-Size", str(len(data)))
            # no length anywhere: the connection closes when the server is done, which it never is
            else:
                self.send_header("Connection", "close")
                self.close_connection = True
            self.end_headers()
            self.wfile.write(data)
            try:
                while True:
                    self.wfile.write(b"\0" * 65536)
            except OSError:
                return
        if fault.get("corrupt_once"):
            fault["corrupt_once"] = False
            body = bytes([body[0] ^ 0xFF]) + body[1:]
        cut = fault.pop("cut_once", None)
        self.send_response(206 if start else 200)
        if fault.get("etag", True):
            self.send_header("ETag", etag)
            self.send_header("X-Linked-Etag", etag)
        if start:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        if fault.get("no_length"):
            self.send_header("Connection", "close")
            self.close_connection = True
        else:
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if cut:
            body = body[:int(len(body) * cut)]
        for i in range(0, len(body), 4096):
            self.wfile.write(body[i:i + 4096])
            time.sleep(fault.get("delay", 0))
        if cut:
            self.wfile.flush()
            self.connection.shutdown(2)


@pytest.fixture(scope="session")
def model_files(ckpt):
    return {n: open(os.path.join(ckpt, n), "rb").read() for n in os.listdir(ckpt)}


@pytest.fixture
def served(model_files, monkeypatch, tmp_path):
    # the retries are what is tested, not their wait (7.5 s a file)
    monkeypatch.setattr(hub, "BACKOFF", 0.01)
    Hub.files, Hub.log, Hub.faults = dict(model_files), [], {}
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Hub)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{httpd.server_address[1]}"
    monkeypatch.setenv("HF_ENDPOINT", url)
    yield url, str(tmp_path / "cache")
    httpd.shutdown()


def gets(name):
    return sum(1 for n, _, _ in Hub.log if n == name)


@pytest.mark.parametrize("bad",
                         ["../../escape.safetensors", "/tmp/escape.safetensors",
                          "a/../../x.safetensors", "..", "sub\\..\\..\\x.safetensors", 7,
                          ".complete", "model.safetensors.partial"])
def test_an_index_naming_a_file_outside_the_folder_is_refused(served, tmp_path, bad):
    _, cache = served
    Hub.files["model.safetensors.index.json"] = json.dumps({"weight_map": {"w": bad}}).encode()
    with pytest.raises(hub.HubError,
                       match="outside the model folder|not a safetensors index|only this cache"):
        hub.resolve(REPO, cache=cache)
    assert not os.path.exists(tmp_path / "escape.safetensors") and not os.path.exists(
        "/tmp/escape.safetensors"
    )
    assert not any("escape" in n or n.endswith("x.safetensors") for n, _, _ in Hub.log)


def test_a_corrupted_download_is_caught_by_its_checksum(served, model_files):
    _, cache = served
    Hub.faults = {"model.safetensors": {"corrupt_once": True}}   # same length, one byte wrong
    folder = hub.resolve(REPO, cache=cache)
    assert (open(os.path.join(folder, "model.safetensors"),
                 "rb").read() == model_files["model.safetensors"])
    assert gets("model.safetensors") == 2


def test_files_without_a_length_are_never_complete_on_faith(served, model_files):
    _, cache = served
    Hub.faults = {"model.safetensors": {"no_length": True, "etag": False, "cut_once": 0.5},
                  "tokenizer.model": {"no_length": True, "etag": False, "cut_once": 0.7},
                  "config.json": {"no_length": True, "etag": False}}
    folder = hub.resolve(REPO, cache=cache)
    for name in ("model.safetensors", "tokenizer.model", "config.json"):
        assert open(os.path.join(folder, name), "rb").read() == model_files[name], name
    # the cut safetensors fails its own header's length; the tokenizer needs two copies that agree
    assert (
        gets("model.safetensors") == 2 and gets("tokenizer.model") >= 3 and gets("config.json") == 1
    )


@pytest.mark.parametrize("server_honours_if_range", [True, False])
def test_a_file_changed_between_a_partial_download_and_its_resume(served, model_files,
                                                                  server_honours_if_range):
    _, cache = served
    old = model_files["model.safetensors"]
    # the tensors, after the header
    body = 8 + int.from_bytes(old[:8], "little")
    new = old[:body] + bytes(b ^ 0x5A for b in old[body:])             # same length, other weights
    target = os.path.join(cache, "someone--tiny", "main")
    os.makedirs(target)
    with open(os.path.join(target, "model.safetensors.partial"), "wb") as f:
        f.write(old[:len(old) // 2])
    with open(os.path.join(target, "model.safetensors.partial.json"), "w") as f:
        etag = '"' + hashlib.sha256(old).hexdigest() + '"'
        json.dump({"size": len(old), "sha256": etag.strip('"'), "validator": etag}, f)
    Hub.files["model.safetensors"] = new
    Hub.faults = {"model.safetensors": {"if_range": server_honours_if_range}}
    folder = hub.resolve(REPO, cache=cache)
    assert open(os.path.join(folder, "model.safetensors"), "rb").read() == new     # never a splice
    ranges = [r for n, r, _ in Hub.log if n == "model.safetensors"]
    # If-Range honoured: one request, answered whole; ignored: the 206 of another file is noticed,
    # and refetched
    assert ranges == [f"bytes={len(old) // 2}-"] + ([] if server_honours_if_range else [None])


@pytest.mark.slow
def test_four_processes_resolving_one_model_download_it_once(served):
    url, cache = served
    Hub.faults = {"model.safetensors": {"delay": 0.002}}
    code = f"from plumbing import hub; print(hub.resolve({REPO!r}, cache={cache!r}))"
    env = {"HF_ENDPOINT": url, "PYTHONPATH": ROOT}
    procs = [run_command([sys.executable, "-c", code], env=env, wait=False) for _ in range(4)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), [e for _, e in outs]
    assert len({o.strip() for o, _ in outs}) == 1
    counts = collections.Counter(n for n, _, _ in Hub.log)
    assert counts["model.safetensors"] == 1 and counts["config.json"] == 1
    assert not [f for f in os.listdir(outs[0][0].strip()) if f.endswith((".partial",
                                                                         ".partial.json"))]


def test_a_captive_portal_poisons_nothing(served, model_files):
    _, cache = served
    # every file: a login page
    Hub.faults = {name: {"portal": True, "etag": False} for name in model_files}
    with pytest.raises(hub.HubError, match="HTML page"):
        hub.resolve(REPO, cache=cache)
    # back on a real network
    Hub.faults = {}
    folder = hub.resolve(REPO, cache=cache)
    for name in ("config.json", "tokenizer.model", "model.safetensors"):
        assert open(os.path.join(folder, name), "rb").read() == model_files[name]


def test_a_body_longer_than_announced_is_cut_not_stored(served, tmp_path):
    _, cache = served
    Hub.faults = {"config.json": {"endless": "announced"}}
    with pytest.raises(hub.HubError, match="more than the"):
        hub.resolve(REPO, cache=cache)
    sizes = [os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(cache) for f in fs]
    assert max(sizes, default=0) < 1 << 20


@pytest.mark.parametrize("name", ["config.json", "model.safetensors"])
def test_an_endless_body_with_no_length_anywhere_is_refused(served, name):
    """No Content-Length, no hub size, no ETag: a weights file is held to what its own header says,
    any other file to 64 MiB; the disk is never filled."""
    _, cache = served
    Hub.faults = {name: {"endless": "unannounced", "etag": False}}
    with pytest.raises(hub.HubError, match="more than the"):
        hub.resolve(REPO, cache=cache)
    sizes = [os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(cache) for f in fs]
    assert max(sizes, default=0) <= (64 << 20) + (1 << 20)


@pytest.mark.parametrize("header", [b"[1, 2, 3]", b"[" * 100000 + b"]" * 100000])
def test_a_hostile_safetensors_header_is_refused_in_one_line(served, header):
    _, cache = served
    body = len(header).to_bytes(8, "little") + header + b"\0" * 64
    Hub.faults = {"model.safetensors": {"body": body, "no_length": True, "etag": False}}
    with pytest.raises(hub.HubError, match="not what its name says|not whole"):
        hub.resolve(REPO, cache=cache)
