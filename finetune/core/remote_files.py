"""Files a recipe names by URL (MT-Bench questions, judge prompts, reference answers): fetched once, then cached.

A recipe that names `https://...` instead of a path runs on any machine with network access; the file is
downloaded on first use into `$MOETUNE_CACHE/downloads` (default `~/.cache/moetune/downloads`) under a name
derived from the URL, and read from there afterwards (also offline). Local paths stay relative to the recipe's folder.
"""

from __future__ import annotations

import hashlib
import os
import urllib.error
import urllib.request
from pathlib import Path

TIMEOUT_S = 60


def is_url(name: str) -> bool:
    return name.startswith(("http://", "https://"))


def recipe_file(name: str, base_dir: Path) -> Path:
    """The local file behind a name in a recipe: a URL's cached download, or a path relative to the recipe's folder."""
    return fetch(name) if is_url(name) else (Path(base_dir) / name).resolve()


def moetune_cache() -> Path:
    """moetune's cache folder: $MOETUNE_CACHE, default ~/.cache/moetune."""
    return Path(os.environ.get("MOETUNE_CACHE", Path.home() / ".cache" / "moetune"))


def cache_dir() -> Path:
    return moetune_cache() / "downloads"


def cached_path(url: str) -> Path:
    """`<sha of the url>-<file name>`: one file per URL, recognisable by its name."""
    name = url.rstrip("/").rsplit("/", 1)[-1].split("?")[0] or "download"
    return cache_dir() / f"{hashlib.sha256(url.encode()).hexdigest()[:16]}-{name}"


def fetch(url: str) -> Path:
    """Download `url` unless it is cached; the file appears whole or not at all."""
    path = cached_path(url)
    if path.is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    print(f"[download] {url} -> {path}", flush=True)
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT_S) as response, open(tmp, "wb") as out:
            while chunk := response.read(1 << 20):
                out.write(chunk)
    except (urllib.error.URLError, OSError) as error:
        tmp.unlink(missing_ok=True)
        reason = error if isinstance(error, urllib.error.HTTPError) else getattr(error, "reason", error)
        raise ValueError(f"{url}: could not download it ({reason}). Check the URL and the network, or download the "
                         f"file yourself and name its local path in the recipe instead.") from None
    os.replace(tmp, path)
    return path
