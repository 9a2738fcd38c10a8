"""Secrets out of everything we write: a key must never reach a row, a log line or a traceback.

Servers echo keys back in error messages, whole or cut, and in whatever encoding their framework uses.
A `Redactor` replaces every stretch of WINDOW or more characters of a secret (in any letter case; or of
its hex or base64 form) by ***; a text that still holds one once its URL, JSON or HTML escapes are
decoded (up to three layers, in any order) is given back decoded, and masked. A "key" shorter than
WINDOW characters (the "EMPTY" a local vLLM server takes) is no secret and is left alone: masking it
would mangle every caption that spells it.
"""

import base64
import html
import itertools
import re
import urllib.parse

WINDOW = 8   # a stretch this long of a secret counts as the secret (a key cut short is still a key)
MASK = "***"


def _base64_cores(secret: bytes):
    """The base64 characters that depend on the secret's bytes alone, at each of the three alignments the
    secret can have inside a longer encoded text (e.g. "Authorization: Bearer KEY" encoded whole)."""
    for offset in range(3):
        encoded = base64.b64encode(bytes(offset) + secret).decode()
        first, last = -(-8 * offset // 6), (8 * (offset + len(secret))) // 6
        for core in (encoded[first:last], encoded[first:last].replace("+", "-").replace("/", "_")):
            yield core


def _unescape_json(text):
    return re.sub(r"\\u([0-9a-fA-F]{4})", lambda m: chr(int(m.group(1), 16)), text).replace("\\/", "/")


DECODERS = (urllib.parse.unquote_plus, _unescape_json, html.unescape)


class Redactor:
    def __init__(self, *secrets):
        self.windows = set()   # every WINDOW-long piece of every form of every secret
        for secret in secrets:
            if secret and len(secret) >= WINDOW:
                raw = secret.encode()
                for form in (secret.lower(), raw.hex(), *_base64_cores(raw)):
                    self.windows.update(form[i:i + WINDOW] for i in range(len(form) - WINDOW + 1))

    def _mask(self, text: str) -> str:
        marked, lower = [False] * len(text), text.lower()
        for i in range(len(text) - WINDOW + 1):
            if text[i:i + WINDOW] in self.windows or lower[i:i + WINDOW] in self.windows:
                marked[i:i + WINDOW] = [True] * WINDOW
        return "".join(MASK if m and (i == 0 or not marked[i - 1]) else "" if m else c
                       for i, (c, m) in enumerate(zip(text, marked)))

    def __call__(self, text, limit: int = None) -> str:
        """text (anything: it is str()-ed) with the secrets masked; with `limit`, cut to that length,
        after masking (a piece of the key may straddle the cut), and looking at no more of a long text
        than the limit needs."""
        text = str(text)
        if limit is not None:
            text = text[:limit + 12 * max(WINDOW, 64)]   # room for an escaped key across the cut
        if self.windows:
            text = self._mask(text)
            for depth in (1, 2, 3):   # %2573..., &#37;73..., \\u0025...: escapes inside escapes
                for decoders in itertools.product(DECODERS, repeat=depth):
                    decoded = text
                    for decode in decoders:
                        decoded = decode(decoded)
                    if decoded != text and self._mask(decoded) != decoded:
                        text = self._mask(decoded)
        return text if limit is None else text[:limit]

    def row(self, value):
        """A JSON-able value with every string in it scrubbed (the keys of objects are ours: left alone)."""
        if isinstance(value, str):
            return self(value)
        if isinstance(value, dict):
            return {k: self.row(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [self.row(v) for v in value]
        return value
