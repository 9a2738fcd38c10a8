"""One client for OpenAI-compatible chat-completions APIs (Qwen-VL-Max via DashScope, GPT-4-Turbo),
shared by label.py and judge.py: a deadline on every request, retries with backoff, a
requests-per-minute cap, and the three kinds of failure a long run must tell apart (runner.py acts
on them):

  final      the item's answer for good (content moderation): the item is done, with an error row
  transient  worth another try later (timeouts, 5xx, dropped connections, a body of a shape nobody
             expected): retried now; if it still fails, or if it may be this item's alone (a 400),
             the row is written, but the item is not done and a rerun tries it again
  systemic   it would happen to every item (a refused key, no quota, a wrong URL): the run stops

The key comes from an environment variable, goes in one header, and is scrubbed (redact.py) from
every message. Server bodies are untrusted: any shape gives an answer or a transient failure, never
a crash.
"""

import email.utils
import json
import math
import os
import random
import threading
import time
from collections import namedtuple

import requests
import urllib3

from plumbing import cli
from plumbing.redact import Redactor

RETRY_STATUS = {408, 409, 429, 500, 502, 503, 504}
FINAL_CODES = {"data_inspection_failed", "DataInspectionFailed", "content_filter",
               "content_policy_violation"}
SYSTEMIC_STATUS = {401, 403, 404, 405}
KEY_CODES = {"invalid_api_key", "InvalidApiKey", "access_denied", "AccessDenied"}
QUOTA_CODES = {"insufficient_quota", "Arrearage", "billing_hard_limit_reached"}
SYSTEMIC_CODES = KEY_CODES | QUOTA_CODES | {"model_not_found", "ModelNotFound", "bad_url"}
MAX_BODY = 8 << 20   # an answer is a few KB; a body past this is a broken or hostile server
Reply = namedtuple("Reply", "content finish_reason usage model")


class APIError(Exception):
    def __init__(self, status, code, message):
        super().__init__(f"HTTP {status} {code}: {message}" if status else f"{code}: {message}")
        self.status, self.code = status, code

    @property
    def kind(self):
        return failure_kind(self.status, self.code)


def failure_kind(status, code) -> str:
    """'final', 'systemic' or 'transient' for a failed request's HTTP status and error code."""
    if code in FINAL_CODES:
        return "final"
    if status in SYSTEMIC_STATUS or code in SYSTEMIC_CODES or code == "stopped":
        return "systemic"
    return "transient"


def api_key(env: str) -> str:
    """The key from the environment, stripped; one that cannot be a key is refused without printing
    it."""
    key = os.environ.get(env, "").strip()
    if not key:
        raise ValueError(f"no API key: set the environment variable {env}")
    if any(not 33 <= ord(c) < 127 for c in key):
        raise ValueError(f"${env} holds a space, a control or a non-ASCII character inside the key "
                         f"({len(key)} characters): set it to the key alone")
    return key


class RateLimit:
    """Request starts spaced 60 / per_minute seconds apart, across all threads: never more than
    per_minute in any 60 s window, and no bursts for the provider to refuse."""

    def __init__(self, per_minute):
        if per_minute and per_minute < 1 / 1440:
            raise ValueError(f"--rpm {per_minute:g}: less than one request a day")
        self.gap = 60.0 / per_minute if per_minute else 0.0
        self.next, self.lock = 0.0, threading.Lock()

    def wait(self):
        if not self.gap:
            return
        with self.lock:   # take the next free slot; sleep for it outside the lock
            now = time.monotonic()
            slot = max(now, self.next)
            self.next = slot + self.gap
        time.sleep(max(0.0, slot - now))


def frames_message(urls, prompt, frames_as="images"):
    """One user message of frames (data URLs) and a question: one image_url part a frame (what vLLM
    and most servers take), or one Qwen "video" part holding them all (at least 4 frames)."""
    if frames_as == "video":
        parts = [{"type": "video", "video": urls}]
    else:
        parts = [{"type": "image_url", "image_url": {"url": u}} for u in urls]
    return [{"role": "user", "content": parts + [{"type": "text", "text": prompt}]}]


def retry_after(value, cap: float):
    """Retry-After in seconds, from either form the header takes (a number, an HTTP date), at most
    cap."""
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        try:
            seconds = email.utils.parsedate_to_datetime(value).timestamp() - time.time()
        except (TypeError, ValueError, IndexError, OverflowError):
            return None
    return min(max(0.0, seconds), cap) if math.isfinite(seconds) else cap if seconds > 0 else None


# requests' timeout bounds each read, not the request: a server that sends a byte every few seconds
# holds it for ever. So every request runs under a watchdog that shuts its socket when the deadline
# passes; the connections tell the watchdog of the thread they serve which socket is theirs.
_local = threading.local()


class _Watched:
    def request(self, *args, **kwargs):
        watchdog = getattr(_local, "watchdog", None)
        if watchdog is not None:
            watchdog.conn = self
        return super().request(*args, **kwargs)


class _HTTP(_Watched, urllib3.connection.HTTPConnection):
    pass


class _HTTPS(_Watched, urllib3.connection.HTTPSConnection):
    pass


POOLS = {"http": type("Pool", (urllib3.HTTPConnectionPool,), {"ConnectionCls": _HTTP}),
         "https": type("Pool", (urllib3.HTTPSConnectionPool,), {"ConnectionCls": _HTTPS})}


class _Adapter(requests.adapters.HTTPAdapter):
    def init_poolmanager(self, *args, **kwargs):
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = POOLS

    def proxy_manager_for(self, proxy, **kwargs):
        manager = super().proxy_manager_for(proxy, **kwargs)
        manager.pool_classes_by_scheme = POOLS
        return manager


class Watchdog:
    """`with Watchdog(seconds):` - past the deadline (or when `wake` is set early: an abort), the
    socket of the request in the block is shut down, which ends any read in progress; `fired` says
    so afterwards."""

    def __init__(self, seconds, active=None):
        self.seconds, self.conn, self.fired, self.active = seconds, None, False, active
        self.done, self.wake = threading.Event(), threading.Event()   # wake: the end, or an abort

    def _watch(self):
        self.wake.wait(self.seconds)
        if self.done.is_set():
            return
        self.fired = True
        # the socket may not exist yet (still connecting): look again
        while not self.done.is_set():
            sock = getattr(self.conn, "sock", None)
            if sock is not None:
                try:
                    sock.shutdown(2)   # SHUT_RDWR: a blocked recv returns at once
                except OSError:
                    pass
            self.done.wait(0.05)

    def __enter__(self):
        _local.watchdog = self
        if self.active is not None:
            self.active.add(self)
        threading.Thread(target=self._watch, daemon=True).start()
        return self

    def __exit__(self, *exc):
        self.done.set()
        self.wake.set()
        _local.watchdog = None
        if self.active is not None:
            self.active.discard(self)


def _text(value, depth=0) -> str:
    """Message content as text: a string, null, or a list of parts ({"text": ...} or strings), two
    deep at most (a server that nests parts a thousand deep gets its text ignored, not a
    RecursionError)."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and depth < 2:
        return "".join(_text(p.get("text") if isinstance(p, dict) else p, depth + 1) for p in value)
    if isinstance(value, dict) and depth < 2:
        return _text(value.get("text", value.get("value")), depth + 1)
    return "" if value is None or depth else str(value)


def _count(usage, field):
    """A token count as an int, 0 for anything that is not a plausible one (a string, -1, 1e400,
    10**400)."""
    value = usage.get(field) if isinstance(usage, dict) else None
    number = isinstance(value, int | float) and not isinstance(value, bool)
    return int(value) if number and 0 <= value < 2**53 else 0


def parse_reply(data):
    """A Reply from a chat completion body of any shape; None when it holds no answer at all."""
    choices = data.get("choices") if isinstance(data, dict) else None
    choice = choices[0] if isinstance(choices, list) and choices else choices
    if not isinstance(choice, dict):
        return None
    message = choice.get("message", choice.get("text"))
    if isinstance(message, dict):
        message = message.get("content")
    if message is not None and not isinstance(message, str | list):
        return None   # a number or an object where the text belongs: no answer
    finish = choice.get("finish_reason")
    usage = {f: _count(data.get("usage"), f) for f in ("prompt_tokens", "completion_tokens",
                                                       "total_tokens")}
    model = data.get("model")
    return Reply(_text(message), finish if isinstance(finish, str) else None, usage,
                 model if isinstance(model, str) else None)


def _error_body(data, text):
    """(code, message) from an OpenAI-style error body {"error": {"message", "type", "code"}}, or
    the text."""
    err = data.get("error") if isinstance(data, dict) else None
    if isinstance(err, dict):
        code = err.get("code") or err.get("type") or "error"
        return str(code), _text(err.get("message"))
    if isinstance(data, dict) and isinstance(data.get("code"), str):   # DashScope's native shape
        return data["code"], _text(data.get("message"))
    return "error", (_text(err) if err else text)


class Client:
    def __init__(self, api_base, model, key_env, rpm=None, timeout=120.0, retries=8, backoff=1.0,
                 max_backoff=60.0, max_retry_after=300.0):
        self.key, self.key_env = api_key(key_env), key_env
        self.scrub = Redactor(self.key)
        self.url = api_base.rstrip("/") + "/chat/completions"
        self.model, self.timeout, self.retries = model, timeout, retries
        self.backoff, self.max_backoff, self.max_retry_after = backoff, max_backoff, max_retry_after
        self.limit = RateLimit(rpm)
        self.local = threading.local()
        # set: no new attempts, no more waiting (the run is stopping)
        self.stop = threading.Event()
        self.in_flight = set()          # the watchdogs of the requests under way, for abort()
        # told of every answer: a server that was down is back
        self.answered = threading.Condition()
        self.answers = 0

    def _session(self):
        # requests.Session is not thread-safe: one per thread
        if not hasattr(self.local, "session"):
            s = self.local.session = requests.Session()
            s.mount("http://", _Adapter())
            s.mount("https://", _Adapter())
            s.headers["Authorization"] = f"Bearer {self.key}"
        return self.local.session

    def abort(self):
        """Stop now: no new attempt, and the requests under way are cut (their answers are lost)."""
        self.stop.set()
        for watchdog in list(self.in_flight):
            watchdog.wake.set()

    def _post(self, body):
        """(status, headers, parsed JSON or None, text) of one attempt, within the deadline."""
        with Watchdog(self.timeout, self.in_flight) as watchdog:
            try:
                with self._session().post(self.url, json=body, stream=True,
                                          timeout=(min(self.timeout, 30.0), self.timeout)) as r:
                    data = bytearray()
                    for chunk in r.iter_content(1 << 14):
                        data += chunk
                        if len(data) > MAX_BODY:
                            raise APIError(r.status_code, "body_too_large",
                                           f"more than {MAX_BODY} bytes")
                    status, headers = r.status_code, r.headers
                    # a body whose end nothing announced looks whole when the watchdog cuts it
                    delimited = ("content-length" in headers
                                 or "chunked" in headers.get("transfer-encoding", "").lower())
            except (requests.exceptions.InvalidURL, requests.exceptions.MissingSchema,
                    requests.exceptions.InvalidSchema) as e:
                raise APIError(None, "bad_url", f"{self.url}: {type(e).__name__}") from None
            except APIError:
                raise
            # any way a connection can break: dropped, reset, cut mid-body, TLS, ...
            except Exception as e:
                if watchdog.fired:
                    raise APIError(None, "Timeout",
                                   f"no complete answer within {self.timeout:g} s") from None
                raise APIError(None, type(e).__name__, "no complete answer") from None
        if watchdog.fired and not delimited:
            raise APIError(None, "Timeout", f"no complete answer within {self.timeout:g} s")
        text = data.decode("utf-8", "replace")
        try:
            return status, headers, json.loads(text), text
        except (ValueError, RecursionError):   # RecursionError: [[[[... nested past Python's stack
            return status, headers, None, text

    def chat(self, messages, **params) -> Reply:
        """The answer of one chat completion, after retries; APIError (with its .kind) when it
        fails."""
        body = {"model": self.model, "messages": messages, **params}
        for attempt in range(self.retries + 1):
            if self.stop.is_set():
                raise APIError(None, "stopped", "the run is stopping")
            self.limit.wait()
            wait_for = None
            try:
                status, headers, data, text = self._post(body)
            except APIError as e:   # our own words, no server text in them
                if e.kind == "systemic":
                    raise
                error = e
            else:
                reply = parse_reply(data) if status == 200 else None
                if reply is not None:
                    with self.answered:
                        self.answers += 1
                        self.answered.notify_all()
                    return reply
                if status == 200:
                    error = APIError(200, "malformed_response", self.scrub(text, 200))
                else:
                    code, message = _error_body(data, text)
                    error = APIError(status, self.scrub(code, 64), self.scrub(message, 300))
                    if error.kind != "transient" or status not in RETRY_STATUS:
                        raise error
                    wait_for = retry_after(headers.get("Retry-After"), self.max_retry_after)
            if attempt == self.retries:
                raise error
            if wait_for is not None:   # the server's Retry-After
                self.stop.wait(wait_for)
            else:   # exponential backoff with jitter, so retries do not arrive in waves
                self._back_off(min(self.max_backoff,
                                   self.backoff * 2 ** attempt) * random.uniform(0.5, 1.5),
                               error.status is None)

    def _back_off(self, seconds, unreachable):
        """Wait `seconds` before the next attempt, or until the run stops. After a connection that
        could not be made or finished (no HTTP status: a server that is down), also until any other
        request gets an answer: the first one through after an outage wakes every thread waiting to
        retry, instead of each sleeping out its backoff (up to --max-backoff, a minute)."""
        end = time.monotonic() + seconds
        with self.answered:
            seen = self.answers
            while (not self.stop.is_set() and time.monotonic() < end
                   and not (unreachable and self.answers != seen)):
                self.answered.wait(min(0.5, end - time.monotonic()))


def add_api_flags(p, api_base, model, key_env, concurrency):
    """The flags of every tool that talks to an API through this client: one name, one meaning."""
    p.add_argument("--api-base", default=api_base, help="the OpenAI-compatible endpoint")
    p.add_argument("--model", default=model, help="the model the endpoint serves")
    p.add_argument("--api-key-env", default=key_env,
                   help="the environment variable holding the key")
    p.add_argument("--concurrency", type=cli.positive_int, default=concurrency,
                   help="requests in flight at once")
    p.add_argument("--rpm", type=cli.positive, help="requests per minute, at most (retries count)")
    p.add_argument("--timeout", type=cli.positive, default=120.0,
                   help="seconds for one request, all of it")
    p.add_argument("--retries", type=cli.count, default=8,
                   help="attempts after the first, for a failure worth another try")
    p.add_argument("--backoff", type=cli.non_negative, default=1.0,
                   help="first retry delay, seconds (doubles)")
    p.add_argument("--max-retry-after", type=cli.non_negative, default=300.0,
                   help="the longest Retry-After honoured, seconds")
    p.add_argument("--max-failures-in-a-row", type=cli.positive_int, default=10,
                   help="stop the run when this many items in a row failed")


def api_client(args) -> Client:
    return Client(args.api_base, args.model, args.api_key_env, args.rpm, args.timeout,
                  args.retries, args.backoff, max_retry_after=args.max_retry_after)
