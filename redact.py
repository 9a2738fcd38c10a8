"""Secrets out of everything we write: a key must never reach a row, a log line or a traceback.

Servers echo keys back in error messages, whole or cut, and in whatever encoding their framework uses.
A `Redactor` replaces every stretch of WINDOW or more characters of a secret (in any letter case; or of
its hex or base64 form) by ***; a text that still holds one once its URL, JSON or HTML escapes are
decoded is given back decoded, and masked. Scrub first, cut to length after: a cut must not leave a piece.
"""

import base64
import html
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


class Redactor:
    def __init__(self, *secrets):
        self.windows = {}   # length -> every piece that long of every form of every secret
        for secret in filter(None, secrets):
            raw = secret.encode()
            for form in (secret.lower(), raw.hex(), *_base64_cores(raw)):
                n = min(WINDOW, len(form))
                self.windows.setdefault(n, set()).update(form[i:i + n] for i in range(len(form) - n + 1))

    def _mask(self, text: str) -> str:
        marked, lower = [False] * len(text), text.lower()
        for n, windows in self.windows.items():
            for i in range(len(text) - n + 1):
                if text[i:i + n] in windows or lower[i:i + n] in windows:
                    marked[i:i + n] = [True] * n
        out, i = [], 0
        while i < len(text):
            if marked[i]:
                while i < len(text) and marked[i]:
                    i += 1
                out.append(MASK)
            else:
                out.append(text[i])
                i += 1
        return "".join(out)

    def __call__(self, text) -> str:
        """text (anything: it is str()-ed) with the secrets masked."""
        text = str(text)
        if not self.windows:
            return text
        masked = self._mask(text)
        for decode in (urllib.parse.unquote_plus, _unescape_json, html.unescape):
            decoded = decode(masked)
            if decoded != masked and self._mask(decoded) != decoded:
                masked = self._mask(decoded)
        return masked

    def row(self, value):
        """A JSON-able value with every string in it (keys included) scrubbed."""
        if isinstance(value, str):
            return self(value)
        if isinstance(value, dict):
            return {self(k): self.row(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [self.row(v) for v in value]
        return value
