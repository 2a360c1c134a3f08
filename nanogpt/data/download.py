"""One download helper for the preparers: urllib with a timeout, retries, and an atomic write."""

from __future__ import annotations

import http.client
import os
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from tqdm import tqdm

from nanogpt.data.common import DataError

CHUNK_BYTES = 1 << 16


class DownloadError(DataError):
    """A URL that could not be fetched; the message names it."""


def download(url: str, dest: str | os.PathLike, *, timeout_s: float = 30.0, retries: int = 3,
             backoff_s: float = 1.0) -> Path:
    """Fetch `url` into `dest`; returns `dest`.

    `dest` only ever appears complete (written as dest.part, then renamed). Connection failures,
    timeouts, truncated bodies and HTTP 5xx/408/429 are retried `retries` times in all, with
    exponential backoff from `backoff_s`; other HTTP errors (404...) fail at once.
    """
    dest = Path(dest)
    if urllib.parse.urlsplit(url).scheme not in ("http", "https", "file"):
        raise DownloadError(f"{url}: not an http(s):// or file:// URL")
    if retries < 1:
        raise DownloadError(f"{url}: retries must be at least 1, got {retries}")
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    request = urllib.request.Request(url, headers={"User-Agent": "nanogpt-data-prep"})
    last_error: Exception | None = None
    for attempt in range(1, retries + 1):
        try:
            with urllib.request.urlopen(request, timeout=timeout_s) as response:
                _copy_body(response, part, url)
            os.replace(part, dest)
            return dest
        except ValueError as e:  # malformed URL: retrying cannot help
            raise DownloadError(f"{url}: cannot be downloaded ({e})") from e
        except urllib.error.HTTPError as e:
            if e.code < 500 and e.code not in (408, 429):
                raise DownloadError(f"{url}: HTTP {e.code} {e.reason}") from e
            last_error = e
        except (urllib.error.URLError, http.client.HTTPException, OSError) as e:
            last_error = e  # refused, unreachable, DNS, timeout, connection reset, short body
        finally:
            part.unlink(missing_ok=True)
        if attempt < retries:
            time.sleep(backoff_s * 2 ** (attempt - 1))
    reason = getattr(last_error, "reason", None) or last_error
    raise DownloadError(
        f"{url}: download failed after {retries} attempt(s) with a {timeout_s:g} s timeout: {reason}"
    ) from last_error


def _copy_body(response, part: Path, url: str):
    expected = response.headers.get("Content-Length")
    expected = int(expected) if expected and expected.isdigit() else None
    received = 0
    with open(part, "wb") as f, tqdm(total=expected, unit="B", unit_scale=True, desc=Path(part).name[:-5]) as bar:
        while chunk := response.read(CHUNK_BYTES):
            f.write(chunk)
            received += len(chunk)
            bar.update(len(chunk))
        f.flush()
        os.fsync(f.fileno())
    if expected is not None and received != expected:
        raise http.client.IncompleteRead(b"", expected - received)
