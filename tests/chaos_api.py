"""A chat-completions server that misbehaves on purpose, the way real servers and networks do, from
a seed.

It speaks HTTP/1.1 over a raw socket (so it can break a response at any byte): every request is an
item (told apart by a digest of its content) on its n-th attempt, and (seed, item, n) picks what
happens: a good answer (plain, chunked, in parts, the key echoed inside it), a connection dropped in
the headers or in the body, a stall, a body trickled a byte at a time, HTML with 200 or 502, answers
of shapes nobody documented, 5xx errors that echo the key in several encodings, 429 with a
Retry-After of an hour, a gzip body that does not decompress. An item `final(item)` says is
moderated always gets a 400 `data_inspection_failed` (a final answer) when nothing else goes wrong.

`log` records, per request, the item, the action, and how long the client kept a stalled or trickled
connection open (`held`), so a test can check that no request outlived its deadline.
"""

import base64
import hashlib
import json
import random
import select
import socket
import socketserver
import threading
import time
import urllib.parse

KEY = "sk-chaos-7f3a9c1e5b2d4e6f8a0b-SECRET"
ACTIONS = [  # (action, weight)
    ("ok", 50),
    ("ok_chunked", 8),
    ("ok_parts", 5),
    ("ok_message_string", 3),
    ("ok_usage_null", 3),
    ("ok_echo", 4),
    ("drop_in_headers", 3),
    ("drop_in_body", 4),
    ("drop_in_chunks", 3),
    ("stall", 2),
    ("trickle", 2),
    ("html_200", 2),
    ("html_502", 2),
    ("empty_choices", 2),
    ("no_choices", 1),
    ("content_null", 1),
    ("content_number", 1),
    ("choices_string", 1),
    ("e500_echo", 4),
    ("r429_long", 3),
    ("bad_gzip", 2),
    ("ok_usage_huge", 1),
    ("deep_json", 1),
]   # and, when a script asks for them: "huge_html" (8 MB), "401", "quota", "moderated"


def echoes(key):
    """The key as servers echo it: whole, upper-cased, cut, URL-encoded, JSON-escaped, base64 of the
    header."""
    return [key, key.upper(), key[:14], urllib.parse.quote(key, safe=""),
            "".join(f"\\u{ord(c):04x}" for c in key),
            base64.b64encode(f"Bearer {key}".encode()).decode()]


class ChaosAPI:
    def __init__(self, answer, seed=0, final=lambda item: False, stall=4.0, trickle_gap=0.1,
                 identify=None, script=None, key=KEY):
        self.answer, self.seed, self.final, self.stall, self.gap = (
            answer,
            seed,
            final,
            stall,
            trickle_gap,
        )
        self.key = key   # the key it accepts (None: any, as a local server)
        # item: [action of attempt 1, of attempt 2, ...]; then the seed decides
        self.script = script or {}
        self.identify = identify or (
            lambda body: hashlib.sha256(json.dumps(body["messages"]).encode()).hexdigest()
        )
        self.attempts, self.log, self.lock = {}, [], threading.Lock()
        api = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self):
                self.request.settimeout(30)
                f = self.request.makefile("rb")
                try:
                    while api.serve_one(self.request, f):
                        pass
                except OSError:   # the client reset the connection between two requests
                    pass

        self.server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def close(self):
        self.server.shutdown()
        self.server.server_close()

    def serve_one(self, sock, f):
        """One request on a kept-alive connection; False when the connection is done."""
        line = f.readline()
        if not line:
            return False
        headers = {}
        while (h := f.readline()) not in (b"\r\n", b"\n", b""):
            k, _, v = h.decode().partition(":")
            headers[k.strip().lower()] = v.strip()
        body = json.loads(f.read(int(headers.get("content-length", 0))))
        item = self.identify(body)
        with self.lock:
            n = self.attempts[item] = self.attempts.get(item, 0) + 1
        rng = random.Random(f"{self.seed}/{item}/{n}")
        action = rng.choices([a for a, _ in ACTIONS], [w for _, w in ACTIONS])[0]
        arg = None
        with self.lock:
            if self.script.get(item):
                action = self.script[item].pop(0)
        if isinstance(action, tuple):   # (action, its argument): ("r429_long", "3600")
            action, arg = action
        if self.key and headers.get("authorization") != f"Bearer {self.key}":
            action = "401"
        elif action.startswith("ok") and self.final(item):
            action = "moderated"
        entry = {"item": item, "attempt": n, "action": action, "t": time.monotonic()}
        with self.lock:
            self.log.append(entry)
        try:
            return self.act(sock, action, body, item, rng, entry, arg)
        except OSError:   # the client hung up: what a deadline does
            entry["held"] = time.monotonic() - entry["t"]
            return False

    def completion(self, content, usage=True):
        return {"id": "chaos", "model": "chaos-vl",
                "choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                             "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 100, "completion_tokens": 20,
                          "total_tokens": 120} if usage else None}

    def act(self, sock, action, body, item, rng, entry, arg=None):
        text = self.answer(body, item)
        echo = rng.choice(echoes(KEY))
        if action == "ok":
            return send(sock, 200, self.completion(text))
        if action == "ok_chunked":
            return send(sock, 200, self.completion(text), chunked=True)
        if action == "ok_parts":
            half = len(text) // 2
            return send(sock, 200,
                        self.completion([{"type": "text", "text": text[:half]}, text[half:]]))
        if action == "ok_message_string":
            return send(sock, 200,
                        {"choices": [{"message": text, "finish_reason": "stop"}], "usage": {}})
        if action == "ok_usage_null":
            return send(sock, 200, self.completion(text, usage=False))
        if action == "slow_ok":   # a good answer, arg seconds later
            time.sleep(arg or 1.0)
            return send(sock, 200, self.completion(text))
        if action == "ok_usage_huge":
            reply = self.completion(text)
            reply["usage"] = {"prompt_tokens": 10**400, "completion_tokens": -1,
                              "total_tokens": "many"}
            return send(sock, 200, reply)
        if action == "deep_json":   # nested past Python's recursion limit
            return send(sock, 200, b"[" * 100000 + b"]" * 100000)
        if action == "huge_html":
            return send(sock, 200, b"<html>" + b"<p>welcome</p>" * 600000 + b"</html>",
                        ctype="text/html")
        if action == "ok_echo":   # the key inside the answer itself
            return send(sock, 200, self.completion(text + f" (request signed {echo})"))
        if action == "moderated":
            return send(sock, 400,
                        {"error": {"code": "data_inspection_failed",
                                   "message": f"Input inappropriate {echo}"}})
        if action == "401":
            return send(sock, 401,
                        {"error": {"code": "invalid_api_key",
                                   "message": f"Incorrect API key {echo}"}})
        if action == "quota":
            return send(sock, 429,
                        {"error": {"code": "insufficient_quota",
                                   "message": f"You exceeded your quota {echo}"}})
        if action == "drop_in_headers":
            sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: appli")
            return hang_up(sock)
        if action in ("drop_in_body", "drop_in_chunks"):
            data = json.dumps(self.completion(text)).encode()
            cut = rng.randrange(1, len(data))
            if action == "drop_in_body":
                sock.sendall(head(200, {"Content-Length": len(data)}) + data[:cut])
            else:
                sock.sendall(
                    head(200, {"Transfer-Encoding": "chunked"})
                    + b"%x\r\n" % cut
                    + data[:cut]
                    + b"\r\n"
                )
            return hang_up(sock)
        # headers, then nothing or a byte at a time: the deadline must end it
        if action in ("stall", "trickle"):
            data = json.dumps(self.completion(text)).encode()
            sock.sendall(head(200, {"Content-Length": len(data)}))
            for i in range(int(self.stall / self.gap)):
                if action == "trickle":
                    sock.sendall(data[i:i + 1])
                if client_hung_up(sock, self.gap):
                    entry["held"] = time.monotonic() - entry["t"]
                    return False
            entry["held"] = None   # the server gave up first: the client did not end it in time
            return hang_up(sock)
        if action == "html_200":
            return send(sock, 200, b"<html><body>Welcome to nginx!</body></html>",
                        ctype="text/html")
        if action == "html_502":
            return send(sock, 502, b"<html><head><title>502 Bad Gateway</title></head></html>",
                        ctype="text/html")
        if action == "empty_choices":
            return send(sock, 200, {"choices": [], "usage": None})
        if action == "no_choices":
            return send(sock, 200, {"object": "chat.completion", "model": None})
        if action == "content_null":
            return send(sock, 200, self.completion(None))
        if action == "content_number":
            return send(sock, 200, self.completion(42))
        if action == "choices_string":
            return send(sock, 200, {"choices": "none today"})
        if action == "e500_echo":
            return send(sock, 500,
                        {"error": {"code": f"internal {echo}",
                                   "message": f"upstream refused {echo}"}})
        if action == "r429_long":
            return send(sock, 429,
                        {"error": {"code": "rate_limit_exceeded", "message": "slow down"}},
                        extra={"Retry-After": arg or rng.choice(["3600",
                                                                 "Wed, 21 Oct 2099 07:28:00 GMT",
                                                                 "soon", "1e999"])})
        if action == "bad_gzip":
            return send(sock, 200, b"\x1f\x8b\x08\x00garbage-not-gzip", ctype="application/json",
                        extra={"Content-Encoding": "gzip"})
        raise AssertionError(action)


def head(status, headers):
    lines = [f"HTTP/1.1 {status} X"] + [f"{k}: {v}" for k, v in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def send(sock, status, payload, chunked=False, ctype="application/json", extra=None):
    data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    headers = {"Content-Type": ctype, **(extra or {})}
    if chunked:
        headers["Transfer-Encoding"] = "chunked"
        parts = [data[i:i + 37] for i in range(0, len(data), 37)]
        data = b"".join(b"%x\r\n" % len(p) + p + b"\r\n" for p in parts) + b"0\r\n\r\n"
    else:
        headers["Content-Length"] = len(data)
    sock.sendall(head(status, headers) + data)
    return True


def client_hung_up(sock, wait):
    if not select.select([sock], [], [], wait)[0]:
        return False
    try:
        return sock.recv(1, socket.MSG_PEEK) == b""
    except OSError:
        return True


def hang_up(sock):
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    return False
