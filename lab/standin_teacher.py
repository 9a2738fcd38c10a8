"""A stand-in teacher, to try the loop offline: python -m lab.standin_teacher [--port 8000]

An OpenAI-compatible chat-completions server (POST /v1/chat/completions, any key, any model name)
that describes the frames it is sent, the way a vision model would if it could only see colour and
place: the colour of what stands out from the background, where it is in the first frame, which way
it moves from frame to frame, and the background's colour ("A red shape at the top left moves right
then down on a dark background."). It reads frames sent as images (`label.py --frames-as images`) or
as one `video` part (Qwen's form, label.py's default), in any count (recheck sends 16). Its labels
are true of the toy's world (`python toy.py` makes one in toy_out/world) and of anything with one
moving thing; a fine-tune on them learns colours, places and motion. It is not a teacher for real
videos: serve a vision model for those (docs/quickstart.md).
"""

import argparse
import base64
import http.server
import io
import json

import av
import numpy as np

COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 80, 220),
           "yellow": (230, 210, 40), "purple": (150, 60, 190), "orange": (240, 140, 30),
           "white": (240, 240, 240), "black": (15, 15, 15), "grey": (128, 128, 128)}
ROWS, COLS = ("top", "middle", "bottom"), ("left", "center", "right")


def decode(url):
    """A data URL's image as an (H, W, 3) uint8 array."""
    with av.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))) as c:
        return next(c.decode(video=0)).to_ndarray(format="rgb24")


def name_of(rgb):
    return min(COLOURS, key=lambda k: sum((a - b) ** 2 for a, b in zip(COLOURS[k], rgb)))


def describe(frames):
    """What the frames show: the thing that differs most from the background (the frame's median
    colour), its colour, its place in the first frame, and its moves between frames."""
    bg = np.median(np.concatenate([f.reshape(-1, 3) for f in frames]), axis=0)
    centres, colour = [], None
    for f in frames:
        far = np.abs(f.astype(np.float32) - bg).sum(-1)
        mask = far > max(60.0, far.max() * 0.5)
        if not mask.any():
            continue
        ys, xs = np.nonzero(mask)
        centres.append((xs.mean() / f.shape[1], ys.mean() / f.shape[0]))
        colour = colour or name_of(f[mask].mean(0))
    if not centres:
        return f"A still {name_of(bg)} frame with nothing moving."
    x, y = centres[0]
    row, col = ROWS[min(int(y * 3), 2)], COLS[min(int(x * 3), 2)]
    where = " ".join(w for w in (row, col) if w not in ("middle", "center")) or "center"
    moves = []
    for (x0, y0), (x1, y1) in zip(centres, centres[1:]):
        for step, d in (
            (x1 - x0, "right" if x1 > x0 else "left"),
            (y1 - y0, "down" if y1 > y0 else "up"),
        ):
            if abs(step) > 0.08 and (not moves or moves[-1] != d):
                moves.append(d)
    shade = "dark" if bg.mean() < 96 else "light" if bg.mean() > 160 else name_of(bg)
    motion = f"moves {' then '.join(moves)}" if moves else "stays still"
    return f"A {colour} shape at the {where} {motion} on a {shade} background."


def frames_of(body):
    urls = []
    for message in body.get("messages", []):
        content = message.get("content")
        for part in content if isinstance(content, list) else []:
            if part.get("type") == "image_url":
                urls.append(part["image_url"]["url"])
            elif part.get("type") == "video":
                urls += list(part["video"])
    return [decode(u) for u in urls]


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_POST(self):
        try:
            body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
            text = describe(frames_of(body))
            answer = {"id": "standin", "object": "chat.completion",
                      "model": body.get("model", "standin"),
                      "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                   "finish_reason": "stop"}],
                      "usage": {"prompt_tokens": 0, "completion_tokens": len(text.split()),
                                "total_tokens": 0}}
            self._send(200, answer)
        except Exception as e:  # a request it cannot read: a 400 with why, as a server would
            self._send(400,
                       {"error": {"message": f"{type(e).__name__}: {e}",
                                  "type": "invalid_request_error"}})

    def _send(self, status, payload):
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--host", default="127.0.0.1")
    args = p.parse_args(argv)
    server = http.server.ThreadingHTTPServer((args.host, args.port), Handler)
    print(
        f"a stand-in teacher on http://{args.host}:{args.port}/v1 (any key, any --model); Ctrl-C "
        f"stops it"
    )
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
