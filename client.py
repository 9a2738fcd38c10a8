"""One client for OpenAI-compatible chat-completions APIs (Qwen-VL-Max via DashScope, GPT-4-Turbo), shared
by label.py and judge.py: retries with backoff, a requests-per-minute cap, a pool of concurrent requests.

Retried: 408, 409, 429, 5xx, timeouts, dropped connections, a 200 whose body is not JSON, honouring
Retry-After. Not retried (the item gets an error row at once): 400 (Qwen's content moderation,
`data_inspection_failed`), 401, 403, 404, and 429 `insufficient_quota`, which waiting does not fix.
The API key is read from an environment variable, sent in one header, and scrubbed from every message.
"""

import email.utils
import os
import random
import threading
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait

import requests

RETRY_STATUS = {408, 409, 429, 500, 502, 503, 504}
FINAL_CODES = {"insufficient_quota", "data_inspection_failed", "invalid_api_key", "access_denied"}


class APIError(Exception):
    def __init__(self, status, code, message):
        super().__init__(f"HTTP {status} {code}: {message}" if status else f"{code}: {message}")
        self.status, self.code = status, code


class RateLimit:
    """Request starts spaced 60 / per_minute seconds apart, across all threads: never more than per_minute
    in any 60 s window, and no bursts for the provider to refuse."""

    def __init__(self, per_minute):
        self.gap, self.next, self.lock = (60.0 / per_minute if per_minute else 0.0), 0.0, threading.Lock()

    def wait(self):
        if not self.gap:
            return
        with self.lock:   # take the next free slot; sleep for it outside the lock
            now = time.monotonic()
            slot = max(now, self.next)
            self.next = slot + self.gap
        time.sleep(max(0.0, slot - now))


def _retry_after(value):
    """Retry-After as seconds, from either form the header takes (a number, or an HTTP date)."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        try:
            return max(0.0, email.utils.parsedate_to_datetime(value).timestamp() - time.time())
        except (TypeError, ValueError):
            return None


class Client:
    def __init__(self, api_base, model, key_env, rpm=None, timeout=120.0, retries=8, backoff=1.0, max_backoff=60.0):
        self.key = os.environ.get(key_env)
        if not self.key:
            raise ValueError(f"no API key: set the environment variable {key_env}")
        self.url = api_base.rstrip("/") + "/chat/completions"
        self.model, self.timeout, self.retries = model, timeout, retries
        self.backoff, self.max_backoff = backoff, max_backoff
        self.limit = RateLimit(rpm)
        self.local = threading.local()

    def scrub(self, text: str) -> str:
        return str(text).replace(self.key, "***")

    def _session(self):
        if not hasattr(self.local, "session"):   # requests.Session is not thread-safe: one per thread
            self.local.session = requests.Session()
            self.local.session.headers["Authorization"] = f"Bearer {self.key}"
        return self.local.session

    def chat(self, messages, **params) -> dict:
        """The parsed JSON response of one chat completion, after retries; APIError when it fails."""
        body = {"model": self.model, "messages": messages, **params}
        for attempt in range(self.retries + 1):
            self.limit.wait()
            wait_for = None
            try:
                r = self._session().post(self.url, json=body, timeout=self.timeout)
            except (requests.Timeout, requests.ConnectionError) as e:
                error = APIError(None, type(e).__name__, "no complete answer")
            else:
                if r.status_code == 200:
                    try:
                        data = r.json()
                        data["choices"][0]["message"]
                        return data
                    except (ValueError, KeyError, IndexError, TypeError):
                        error = APIError(200, "malformed_response", self.scrub(r.text[:200]))
                else:
                    code, message = _error_body(r)
                    error = APIError(r.status_code, code, self.scrub(message))
                    if r.status_code not in RETRY_STATUS or code in FINAL_CODES:
                        raise error
                    wait_for = _retry_after(r.headers.get("Retry-After"))
            if attempt == self.retries:
                raise error
            if wait_for is None:   # exponential backoff with jitter, so retries do not arrive in waves
                wait_for = min(self.max_backoff, self.backoff * 2 ** attempt) * random.uniform(0.5, 1.5)
            time.sleep(wait_for)


def _error_body(r):
    """(code, message) from an OpenAI-style error body {"error": {"message", "type", "code"}}, or the text."""
    try:
        err = r.json().get("error") or {}
        return str(err.get("code") or err.get("type") or "error"), str(err.get("message", ""))[:300]
    except (ValueError, AttributeError):
        return "error", r.text[:300]


def run_concurrently(jobs, work, workers: int):
    """Yield work(job) for every job, computed on `workers` threads, in the order they finish. Jobs are
    pulled as threads free up (at most 2 x workers waiting), so a million-item iterator is never listed."""
    with ThreadPoolExecutor(max_workers=workers) as pool:
        pending = set()
        for job in jobs:
            while len(pending) >= 2 * workers:
                done, pending = wait(pending, return_when=FIRST_COMPLETED)
                yield from (f.result() for f in done)
            pending.add(pool.submit(work, job))
        while pending:
            done, pending = wait(pending, return_when=FIRST_COMPLETED)
            yield from (f.result() for f in done)
