"""A local server speaking the chat-completions protocol, told per item how to misbehave.

Items are told apart by content: for label requests, the colour of the first frame (each test video
has its own); for judge requests, a marker word in the candidate caption. A script maps an item to
the actions of its successive attempts; an item without (more) script gets a normal answer."""

import base64
import http.server
import io
import json
import threading
import time

import av
import numpy as np

KEY = "sk-test-0123456789-SECRET"


def colour_of(url):
    data = base64.b64decode(url.split(",", 1)[1])
    with av.open(io.BytesIO(data)) as c:
        frame = next(c.decode(video=0)).to_ndarray(format="rgb24")
    return frame.reshape(-1, 3).mean(0), frame.shape


class FakeAPI:
    def __init__(self, identify, answer):
        self.identify, self.answer = identify, answer
        self.script, self.log, self.lock = {}, [], threading.Lock()
        self.inflight = self.max_inflight = 0
        api = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with api.lock:
                    api.inflight += 1
                    api.max_inflight = max(api.max_inflight, api.inflight)
                try:
                    api.handle(self, body)
                finally:
                    with api.lock:
                        api.inflight -= 1

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def close(self):
        self.httpd.shutdown()

    def handle(self, h, body):
        item = self.identify(body)
        with self.lock:
            self.log.append(dict(t=time.monotonic(), item=item,
                                 auth=h.headers.get("Authorization"), body=body))
            steps = self.script.get(item, [])
            action = steps.pop(0) if steps else ("ok",)
        if h.headers.get("Authorization") != f"Bearer {KEY}":
            action = ("status", 401, "invalid_api_key", {})
        kind = action[0]
        if kind == "hang":
            time.sleep(action[1])
            return self.reply(h, 200, self.completion(self.answer(body, item)))
        if kind == "drop":
            h.close_connection = True
            h.connection.close()
            return
        if kind == "malformed":
            return self.reply(h, 200, b'{"choices": [{"message": ', raw=True)
        if kind == "status":
            _, status, code, headers = action
            # a provider that echoes the key: the client must scrub it
            message = f"{code} happened for the key {h.headers.get('Authorization', '')[7:]}"
            return self.reply(
                h, status, {"error": {"message": message, "type": "error", "code": code}}, headers
            )
        if kind == "content":
            return self.reply(h, 200,
                              self.completion(action[1], action[2] if len(action) > 2 else "stop"))
        return self.reply(h, 200, self.completion(self.answer(body, item)))

    def completion(self, content, finish="stop"):
        return {"id": "x", "model": "fake-vl",
                "choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                             "finish_reason": finish}],
                "usage": {"prompt_tokens": 100, "completion_tokens": 20, "total_tokens": 120}}

    def reply(self, h, status, payload, headers=None, raw=False):
        data = payload if raw else json.dumps(payload).encode()
        h.send_response(status)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            h.send_header(k, v)
        h.end_headers()
        h.wfile.write(data)


def frames_of(body):
    parts = body["messages"][0]["content"]
    if parts[0]["type"] == "video":
        return parts[0]["video"]
    return [p["image_url"]["url"] for p in parts if p["type"] == "image_url"]


def label_server(colours):
    """Items are video indices, found by the nearest colour of the first frame."""
    def identify(body):
        mean, _ = colour_of(frames_of(body)[0])
        return int(np.argmin([np.abs(mean - np.array(c)).sum() for c in colours]))

    return FakeAPI(
        identify,
        lambda body, item: f"Video {item}: a coloured square moves across a plain background.",
    )
