"""Model folders from the Hugging Face hub over plain HTTP: `ermu2001/pllava-7b` -> a local folder.

Files come from $HF_ENDPOINT (default https://huggingface.co) at /{repo}/resolve/{revision}/{file},
with $HF_TOKEN when set, into a cache folder (jsonl.cache_dir: $PLLAVA_CACHE, default
~/.cache/pllava). Nothing is taken on faith:
- a file name from the hub's index that would land outside the folder (`..`, an absolute path) is
refused;
- a download goes to `file.partial` and is resumed with Range + If-Range, so a file that changed on
the
  server in between comes again from the start (so does one whose ETag or checksum changed): never a
  splice of two versions;
- a file is complete only when its size is what the hub announced (X-Linked-Size, Content-Range,
  Content-Length) and, for LFS files (the hub gives their sha256 as the ETag), its checksum matches;
  one whose size nothing announced is checked (a safetensors header says how long its file is) or
  fetched twice and compared;
- processes resolving the same model at once (every rank under torchrun) take a lock: one downloads,
the
  others wait for it and use its folder; a folder whose files are all there is used without the
  network.
"""

import hashlib
import json
import os
import re
import sys
import time

import requests

from plumbing.jsonl import ModelFolderError, cache_dir, hold, read_json, safe_name

REQUIRED = ["config.json", "tokenizer.model"]
OPTIONAL = ["tokenizer_config.json", "added_tokens.json", "special_tokens_map.json",
            "preprocessor_config.json", "adapter_config.json", "adapter_model.safetensors"]
CHUNK = 1 << 16   # small enough that a dropped connection keeps most of what arrived
BACKOFF = 0.5     # seconds before the first retry of a file, doubled for each one after


class HubError(RuntimeError):
    pass


def is_hub_id(name: str) -> bool:
    return (re.fullmatch(r"[\w.-]+/[\w.-]+",
                         name) is not None and not os.path.exists(name) and ".." not in name)


def resolve(name: str, revision: str = "main", cache: str = None) -> str:
    """A local folder as it is, or a hub id downloaded (once) into the cache."""
    if os.path.isdir(name):
        return name
    looks_local = (
        name.startswith((".", "/", "~"))
        or os.path.isdir(name.split("/")[0])
        or os.path.exists(name)
    )
    # ./models/x, models/x beside a models/ folder: a mistyped path, not an id to download
    if looks_local:
        raise HubError(f"{name}: no such model folder")
    if not is_hub_id(name) or not re.fullmatch(r"[\w.-]+", revision) or ".." in revision:
        raise HubError(f"{name}: neither a model folder nor a hub id like ermu2001/pllava-7b")
    cache = cache or cache_dir()
    folder = os.path.join(cache, name.replace("/", "--"), revision)
    complete = os.path.join(folder, ".complete")
    if os.path.exists(complete):
        return folder
    made = [p for p in (os.path.dirname(folder), folder) if not os.path.isdir(p)]
    os.makedirs(folder, exist_ok=True)
    lock = hold(os.path.join(folder, ".lock"),
                f"{name} is being downloaded by another process: waiting")
    try:
        if not os.path.exists(complete):   # another process may have finished it while we waited
            _download_folder(name, revision, folder)
            open(complete, "w").close()
    except BaseException:   # nothing came (offline, say): the folders this call made go, empty
        if set(os.listdir(folder)) <= {".lock"}:
            os.remove(os.path.join(folder, ".lock"))
            for path in reversed(made):
                os.rmdir(path)
        raise
    finally:
        os.close(lock)
    return folder


def _download_folder(name, revision, folder):
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")
    base = f"{endpoint}/{name}/resolve/{revision}"
    session = requests.Session()
    # the bytes as stored: sizes and ranges mean bytes on disk
    session.headers["Accept-Encoding"] = "identity"
    if os.environ.get("HF_TOKEN"):
        session.headers["Authorization"] = f"Bearer {os.environ['HF_TOKEN'].strip()}"
    for file in REQUIRED:
        download(session, f"{base}/{file}", os.path.join(folder, file))
    index = os.path.join(folder, "model.safetensors.index.json")
    if download(session, f"{base}/model.safetensors.index.json", index, optional=True):
        shards = _shards(index)
    else:
        shards = ["model.safetensors"]
    for file in shards + OPTIONAL:
        download(session, f"{base}/{file}", os.path.join(folder, file), optional=file in OPTIONAL)


def _shards(index):
    try:
        with open(index) as f:
            weight_map = json.load(f)["weight_map"]
        shards = sorted(set(weight_map.values()))
    except (ValueError, KeyError, TypeError, AttributeError, RecursionError):
        raise HubError(
            f"{index}: not a safetensors index (a weight_map of tensor -> file)"
        ) from None
    try:
        return [safe_name(s) for s in shards]
    except ModelFolderError as e:
        raise HubError(str(e)) from None


def _announced(r):
    """(size, sha256, validator) the server gave for the file: the hub's X-Linked-* headers (on the
    redirect to its CDN, or on the answer itself), else Content-Range / Content-Length; ETag or
    Last-Modified."""
    size = sha = None
    for h in [x.headers for x in r.history] + [r.headers]:
        size = size or _int(h.get("X-Linked-Size"))
        sha = sha or _sha256(h.get("X-Linked-Etag")) or _sha256(h.get("ETag"))
    total = r.headers.get("Content-Range", "").rpartition("/")[2]
    size = (
        size
        or _int(total)
        or (_int(r.headers.get("Content-Length")) if r.status_code == 200 else None)
    )
    etag = r.headers.get("ETag", "")
    validator = etag if etag and not etag.startswith("W/") else r.headers.get("Last-Modified")
    return size, sha, validator


def _int(value):
    return int(value) if value and str(value).isdigit() else None


def _sha256(etag):
    etag = (etag or "").removeprefix("W/").strip('"').lower()
    return etag if re.fullmatch(r"[0-9a-f]{64}", etag) else None


def _digest(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()


def _well_formed(path, name):
    """Does the file's own content say it is whole, and what its name says (not a proxy's or a
    captive portal's HTML page)? None: it cannot tell."""
    size = os.path.getsize(path)
    try:
        with open(path, "rb") as f:
            if f.read(64).lstrip().lower().startswith((b"<!doctype", b"<html", b"<?xml", b"<head")):
                return False
            f.seek(0)
            if name.endswith(".safetensors"):
                return size == _safetensors_size(f)
            if name.endswith(".json"):
                json.load(f)
                return True
    except (ValueError, KeyError, TypeError, IndexError, AttributeError, RecursionError):
        return False
    return None   # nothing to tell by


MAX_HEADER = 100 << 20        # a safetensors header is a few MB at most
# a file nobody said the length of, other than weights, is refused past 64 MiB
MAX_UNANNOUNCED = 64 << 20


def _safetensors_size(f) -> int:
    """The length a safetensors file says it has (its header's 8 + n bytes and the end of its last
    tensor); ValueError when its start is not a safetensors header."""
    n = int.from_bytes(f.read(8), "little")
    if not 0 < n <= MAX_HEADER:
        raise ValueError("not a safetensors header")
    header = json.loads(f.read(n))
    if not isinstance(header, dict):
        raise ValueError("not a safetensors header")
    return (
        8
        + n
        + max([v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"], default=0)
    )


def _most(path, name, got):
    """The most bytes `path` may grow to when the server did not announce its length: what a
    safetensors file's own header says, once it has arrived (None until then); MAX_UNANNOUNCED for
    anything else."""
    if not name.endswith(".safetensors"):
        return MAX_UNANNOUNCED
    with open(path, "rb") as f:
        if got < 8 + MAX_HEADER and (got < 8 or got < 8 + int.from_bytes(f.read(8), "little")):
            return None
        f.seek(0)
        try:
            return _safetensors_size(f)
        except (ValueError, KeyError, TypeError, IndexError, AttributeError, RecursionError):
            raise _Restart("what came is not what its name says (no safetensors header)") from None


def download(session, url: str, dest: str, optional: bool = False, retries: int = 5) -> bool:
    """Fetch url to dest, resuming dest.partial. False for a missing optional file (404)."""
    if os.path.exists(dest):
        return True
    partial, meta_path = dest + ".partial", dest + ".partial.json"
    try:   # what the server said of the file when the partial download began: a hint, {} when cut
        meta = read_json(meta_path)
    except (OSError, ValueError):
        meta = {}
    for attempt in range(retries):
        try:
            meta = _fetch(session, url, partial, meta_path, meta, optional)
            if meta is None:
                return False
            _check(session, url, partial, meta)
            break
        except (requests.RequestException, OSError, _Resume, _Restart) as e:
            if isinstance(e, _Restart):
                _remove(partial, meta_path)
                meta = {}
            if attempt == retries - 1:
                why = str(e) if isinstance(e, _Resume | _Restart) else type(e).__name__
                raise HubError(
                    f"{url}: cannot download ({why}); offline? Use a local folder or a folder "
                    f"already in the cache"
                ) from None
            time.sleep(BACKOFF * 2 ** attempt)
    os.replace(partial, dest)
    _remove(meta_path)
    return True


class _Resume(Exception):
    """The download stopped early: the next attempt asks for the rest."""


class _Restart(Exception):
    """What we have is not (part of) the file the server holds: the next attempt starts from byte
    0."""


def _fetch(session, url, partial, meta_path, meta, optional):
    """One request: the rest of the file appended to `partial`, or all of it written anew. Returns
    what the server announced of the file, or None for a missing optional file."""
    have = os.path.getsize(partial) if os.path.exists(partial) else 0
    headers = {"Range": f"bytes={have}-"} if have else {}
    if have and meta.get("validator"):
        # a changed file comes whole (200), not as a range of it
        headers["If-Range"] = meta["validator"]
    with session.get(url, headers=headers, stream=True, timeout=30, allow_redirects=True) as r:
        if r.status_code == 404 and optional:
            return None
        if r.status_code == 416:   # nothing past what we have: _check says whether it is whole
            return meta
        if r.status_code in (401, 403):
            raise HubError(
                f"{r.url}: HTTP {r.status_code}; is HF_TOKEN set for this (gated?) model?"
            )
        if r.status_code in (408, 429) or r.status_code >= 500:
            raise _Resume(f"HTTP {r.status_code}")
        if r.status_code not in (200, 206):
            raise HubError(f"{r.url}: HTTP {r.status_code}")
        size, sha, validator = _announced(r)
        new = {"size": size, "sha256": sha, "validator": validator}
        if r.status_code == 206:
            start = r.headers.get("Content-Range", "").removeprefix("bytes ").partition("-")[0]
            if start != str(have) or any(meta.get(k) and new[k] and meta[k] != new[k] for k in new):
                raise _Restart("the file on the server is not the one the partial download began")
            # a partial left by an older version of this code: checked at the end
            meta = meta or new
        else:
            meta, have = new, 0
        with open(meta_path, "w") as f:
            json.dump(meta, f)
        with open(partial, "ab" if have else "wb") as f:
            got, t0, shown, most = have, time.monotonic(), 0.0, meta["size"]
            for chunk in r.iter_content(CHUNK):
                f.write(chunk)
                got += len(chunk)
                if most is None:
                    f.flush()
                    most = _most(partial, url, got)
                if most is not None and got > most:  # an endless body must not fill the disk
                    raise _Restart(
                        f"more than the {most} bytes the server announced or the file says"
                    )
                if time.monotonic() - shown > 1.0:   # a 15 GB download is not silent
                    shown = time.monotonic()
                    _progress(os.path.basename(url), got, meta["size"],
                              (got - have) / (shown - t0 + 1e-9))
            _progress(os.path.basename(url), got, meta["size"],
                      (got - have) / (time.monotonic() - t0 + 1e-9), "\n")
    return meta


def _check(session, url, partial, meta):
    """Returns when `partial` is the whole file the server announced; else _Resume or _Restart."""
    got, size = os.path.getsize(partial), meta.get("size")
    if size is not None and got < size:
        raise _Resume(f"the connection closed at byte {got} of {size}")
    if size is not None and got > size:
        raise _Restart(f"{got} bytes where the server announced {size}")
    if meta.get("sha256") and _digest(partial) != meta["sha256"]:
        raise _Restart("its sha256 is not the one the hub announced")
    whole = _well_formed(partial, url)
    if whole is False:
        raise _Restart(
            "what came is not what its name says (an HTML page from a proxy or a login portal?)"
        )
    # nothing said how long it is: its header, or a second copy
    if size is None and not meta.get("sha256"):
        if whole is None:
            again = partial + ".again"
            with session.get(url, stream=True, timeout=30) as r, open(again, "wb") as f:
                r.raise_for_status()
                for chunk in r.iter_content(CHUNK):
                    f.write(chunk)
                    if f.tell() > got:   # not the same file, whatever follows
                        break
            whole = _digest(again) == _digest(partial)
            _remove(again)
        if not whole:
            raise _Restart("its length was not announced and it is not whole")


def _progress(name, got, size, rate, end=""):
    total = f"/{size / 1e6:.1f}" if size else ""
    eta = f", ETA {(size - got) / rate:.0f} s" if size and rate > 0 else ""
    print(f"\r{name}: {got / 1e6:.1f}{total} MB, {rate / 1e6:.1f} MB/s{eta}  ", end=end,
          file=sys.stderr, flush=True)


def _remove(*paths):
    for p in paths:
        if os.path.exists(p):
            os.remove(p)
