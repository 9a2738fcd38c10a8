"""Model folders from the Hugging Face hub over plain HTTP: `ermu2001/pllava-7b` -> a local folder.

Files come from $HF_ENDPOINT (default https://huggingface.co) at /{repo}/resolve/{revision}/{file}, with
$HF_TOKEN when set, into a cache folder ($PLLAVA_CACHE, default ~/.cache/pllava). A download is written
to `file.partial` and resumed with an HTTP Range request after an interruption; a folder whose files are
all present is used without touching the network.
"""

import json
import os
import re
import time

import requests

REQUIRED = ["config.json", "tokenizer.model"]
OPTIONAL = ["tokenizer_config.json", "added_tokens.json", "special_tokens_map.json", "preprocessor_config.json",
            "adapter_config.json", "adapter_model.safetensors"]
CHUNK = 1 << 16   # small enough that a dropped connection keeps most of what arrived


class HubError(RuntimeError):
    pass


def is_hub_id(name: str) -> bool:
    return re.fullmatch(r"[\w.-]+/[\w.-]+", name) is not None and not os.path.exists(name)


def resolve(name: str, revision: str = "main", cache: str = None) -> str:
    """A local folder as it is, or a hub id downloaded (once) into the cache."""
    if os.path.isdir(name):
        return name
    if not is_hub_id(name):
        raise HubError(f"{name}: neither a model folder nor a hub id like ermu2001/pllava-7b")
    cache = cache or os.environ.get("PLLAVA_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "pllava")
    folder = os.path.join(cache, name.replace("/", "--"), revision)
    if os.path.exists(os.path.join(folder, ".complete")):
        return folder
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")
    base = f"{endpoint}/{name}/resolve/{revision}"
    session = requests.Session()
    if os.environ.get("HF_TOKEN"):
        session.headers["Authorization"] = f"Bearer {os.environ['HF_TOKEN']}"
    os.makedirs(folder, exist_ok=True)
    for file in REQUIRED:
        download(session, f"{base}/{file}", os.path.join(folder, file))
    if download(session, f"{base}/model.safetensors.index.json", os.path.join(folder, "model.safetensors.index.json"),
                optional=True):
        with open(os.path.join(folder, "model.safetensors.index.json")) as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
    else:
        shards = ["model.safetensors"]
    for file in shards + OPTIONAL:
        download(session, f"{base}/{file}", os.path.join(folder, file), optional=file in OPTIONAL)
    open(os.path.join(folder, ".complete"), "w").close()
    return folder


def download(session, url: str, dest: str, optional: bool = False, retries: int = 4) -> bool:
    """Fetch url to dest, resuming dest.partial. False for a missing optional file (404)."""
    if os.path.exists(dest):
        return True
    partial = dest + ".partial"
    for attempt in range(retries):
        have = os.path.getsize(partial) if os.path.exists(partial) else 0
        headers = {"Range": f"bytes={have}-"} if have else {}
        try:
            with session.get(url, headers=headers, stream=True, timeout=30, allow_redirects=True) as r:
                if r.status_code == 404 and optional:
                    return False
                if r.status_code == 416:   # nothing left to fetch: the partial file is whole
                    break
                if r.status_code in (401, 403):
                    raise HubError(f"{url}: HTTP {r.status_code}; is HF_TOKEN set for this (gated?) model?")
                if r.status_code not in (200, 206):
                    raise HubError(f"{url}: HTTP {r.status_code}")
                mode = "ab" if r.status_code == 206 else "wb"   # 200: the server ignored the range
                with open(partial, mode) as f:
                    for chunk in r.iter_content(CHUNK):
                        f.write(chunk)
                expected = r.headers.get("Content-Range", "").rpartition("/")[2] or r.headers.get("Content-Length")
            if expected and expected.isdigit() and os.path.getsize(partial) < int(expected):
                raise requests.ConnectionError("connection closed before the end of the file")
            break
        except (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError) as e:
            if attempt == retries - 1:
                raise HubError(f"{url}: cannot download ({type(e).__name__}); offline? Use a local folder "
                               f"or a folder already in the cache") from None
            time.sleep(0.5 * 2 ** attempt)
    os.replace(partial, dest)
    return True
