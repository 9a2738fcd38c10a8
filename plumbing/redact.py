"""Secrets out of everything we write: a key must never reach a row, a log line or a traceback.

Servers echo keys back in error messages, whole or cut, and in whatever encoding their framework
uses. A `Redactor` replaces every stretch of WINDOW or more characters of a secret (in any letter
case; or of its hex or base64 form) by ***; a text that still holds one once its URL, JSON or HTML
escapes are decoded (up to three layers, in any order) is given back decoded, and masked. A "key"
shorter than WINDOW characters (the "EMPTY" a local vLLM server takes) is no secret and is left
alone: masking it would mangle every caption that spells it.
"""

import base64
import html
import re
import urllib.parse

WINDOW = 8   # a stretch this long of a secret counts as the secret (a key cut short is still a key)
MASK = "***"


def _merged(spans):
    """Sorted (start, end) spans with those that overlap or touch joined."""
    out = []
    for a, b in spans:
        if out and a <= out[-1][1]:
            out[-1][1] = max(out[-1][1], b)
        else:
            out.append([a, b])
    return out


def _base64_cores(secret: bytes):
    """The base64 characters that depend on the secret's bytes alone, at each of the three
    alignments the secret can have inside a longer encoded text (e.g. "Authorization: Bearer KEY"
    encoded whole)."""
    for offset in range(3):
        encoded = base64.b64encode(bytes(offset) + secret).decode()
        first, last = -(-8 * offset // 6), (8 * (offset + len(secret))) // 6
        for core in (encoded[first:last], encoded[first:last].replace("+", "-").replace("/", "_")):
            yield core


def _unescape_json(text):
    return re.sub(r"\\u([0-9a-fA-F]{4})", lambda m: chr(int(m.group(1), 16)), text).replace(
        "\\/", "/"
    )


# "+" stays: a key has no space to hide
DECODERS = (urllib.parse.unquote, _unescape_json, html.unescape)
# needles this long, at every 4th character of a form, find every WINDOW-long piece of it
NEEDLE = 5


class Redactor:
    """Linear in the text's length, whatever it holds: the forms of the secret are looked for with
    str.find (short needles at every 4th character of each form: any WINDOW-long piece holds one),
    and only around what is found does a regex mark the exact pieces; escapes are decoded in one
    sweep (all three kinds, three rounds, so any order of up to three layers), never once per
    order."""

    def __init__(self, *secrets):
        # folded: any case
        self.windows, self.needles, forms = set(), set(), {True: set(), False: set()}
        for secret in secrets:
            if secret and len(secret) >= WINDOW:
                raw = secret.encode()
                for form, folded in ((secret.lower(), True), (raw.hex(), True),
                                     *((core, False) for core in _base64_cores(raw))):
                    pieces = {form[i:i + WINDOW] for i in range(len(form) - WINDOW + 1)}
                    forms[folded].update(pieces)
                    self.windows.update(pieces)
                    self.needles.update(
                        (form[i : i + NEEDLE], folded) for i in range(0, len(form) - WINDOW + 1, 4)
                    )
        self.reach = max((len(w) for w in self.windows), default=0) + 64
        self.found = [re.compile("(?=(%s))" % "|".join(map(re.escape, sorted(p))),
                                 re.IGNORECASE if folded else 0) for folded,
                      p in forms.items() if p]

    def _spots(self, text):
        """Where a needle is (a piece of the secret may be near): their positions."""
        low, spots = text.lower(), []
        for needle, folded in self.needles:
            hay = low if folded else text
            i = hay.find(needle)
            while i >= 0:
                spots.append(i)
                i = hay.find(needle, i + 1)
        return sorted(spots)

    def _mask(self, text: str) -> str:
        spans = []
        for lo, hi in _merged((max(0, s - self.reach), s + self.reach) for s in self._spots(text)):
            spans += [
                (m.start(), m.start() + WINDOW)
                for found in self.found
                for m in found.finditer(text, lo, hi)
            ]
        if not spans:
            return text
        out, at = [], 0
        # overlapping or touching pieces: one stretch, one mask
        for a, b in _merged(sorted(spans)):
            out += [text[at:a], MASK]
            at = b
        return "".join(out + [text[at:]])

    def __call__(self, text, limit: int = None) -> str:
        """text (anything: it is str()-ed) with the secrets masked, and, if it holds one once its
        URL, JSON or HTML escapes are decoded (up to three layers, in any order), given back decoded
        and masked; with `limit`, cut to that length after masking (a piece of the key may straddle
        the cut), looking at no more of a long text than the limit needs."""
        text = str(text)
        if limit is not None:
            text = text[:limit + 12 * max(WINDOW, 64)]   # room for an escaped key across the cut
        if self.windows:
            text = self._mask(text)
            # fresh: decoders the text changed since they last ran
            decoded, fresh = text, set(DECODERS)
            for _ in range(3):   # %2573..., &#37;73..., \\u0025...: escapes inside escapes
                for decode in DECODERS:
                    if decode in fresh:
                        fresh.discard(decode)
                        if (new := decode(decoded)) != decoded:
                            decoded, fresh = new, set(DECODERS)
            masked = self._mask(decoded) if decoded != text else decoded
            if masked != decoded:
                text = masked
        return text if limit is None else text[:limit]

    def row(self, value):
        """A JSON-able value with every string in it scrubbed (the keys of objects are ours: left
        alone)."""
        if isinstance(value, str):
            return self(value)
        if isinstance(value, dict):
            return {k: self.row(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [self.row(v) for v in value]
        return value
