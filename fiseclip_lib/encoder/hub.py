"""Weights from the Hugging Face hub as huggingface_hub is configured, read from the environment at call time.

Honoured: `HF_ENDPOINT` (mirrors), `HTTPS_PROXY`/`HTTP_PROXY`/`NO_PROXY`, `HF_HUB_OFFLINE`,
`HF_HOME`/`HF_HUB_CACHE`. huggingface_hub reads these once, at import; a notebook or a test may change them
later, so every call here computes them from `os.environ` and hands them to huggingface_hub through its own
arguments (`endpoint=`, `cache_dir=`, `local_files_only=` while offline). Its constants are never changed:
when it was imported offline and the environment now says online, a download runs in a child process that
imports huggingface_hub under the current environment.

Lookup order for an open_clip tag: the local hub cache (no network), the legacy URL cache, then (when the hub
is not declared offline and answers a time-bounded probe) a download through the configured endpoint.
`pretrained='hf-hub:org/name'` takes the weights (and `open_clip_config.json`'s preprocessing, if present)
from that hub repository.
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import os
import socket
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from fiseclip_lib.encoder.registry import register_model_configs
from fiseclip_lib.errors import FiseclipError, WeightsUnavailableError

HF_HUB_PREFIX = "hf-hub:"
DEFAULT_ENDPOINT = "https://huggingface.co"
HF_WEIGHTS_NAME = "open_clip_pytorch_model.bin"
HF_SAFE_WEIGHTS_NAME = "open_clip_model.safetensors"
HF_CONFIG_NAME = "open_clip_config.json"
PROBE_TIMEOUT_S = 3.0
ANSWER_TIMEOUT_S = 10.0  # an endpoint that accepts a connection must answer an HTTP request within this
_TRUE = {"1", "true", "yes", "on"}


@dataclass(frozen=True)
class HubSettings:
    """The hub configuration in force now (from the environment)."""

    endpoint: str
    cache_dir: str
    offline: bool
    proxy: str | None  # proxy URL used for the endpoint, if any


def hub_settings(cache_dir: str | None = None) -> HubSettings:
    """Compute huggingface_hub's settings from `os.environ` now (not from its import-time constants).

    Args:
        cache_dir: an explicit hub cache folder (`--cache-dir`), which wins over the environment.
    Returns:
        HubSettings.
    """
    env = os.environ
    endpoint = (env.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")
    home = env.get("HF_HOME") or os.path.join(env.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"),
                                              "huggingface")
    home = os.path.expandvars(os.path.expanduser(home))
    hub_cache = cache_dir or env.get("HF_HUB_CACHE") or env.get("HUGGINGFACE_HUB_CACHE") or os.path.join(home, "hub")
    offline = (env.get("HF_HUB_OFFLINE") or env.get("TRANSFORMERS_OFFLINE") or "").strip().lower() in _TRUE
    return HubSettings(endpoint=endpoint, cache_dir=os.path.expandvars(os.path.expanduser(hub_cache)),
                       offline=offline, proxy=_proxy_for(endpoint))


def _proxy_for(url: str) -> str | None:
    """The proxy the environment names for `url` (HTTPS_PROXY / HTTP_PROXY / ALL_PROXY, NO_PROXY respected)."""
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or ""
    if urllib.request.proxy_bypass_environment(host):
        return None
    proxies = urllib.request.getproxies_environment()  # reads upper- and lower-case names now
    return proxies.get(parts.scheme) or proxies.get("all") or None


def _host_port(url: str) -> tuple[str, int]:
    parts = urllib.parse.urlsplit(url if "//" in url else "http://" + url)
    default = 443 if parts.scheme == "https" else 80
    if not parts.hostname:
        raise FiseclipError(f"HF_ENDPOINT/proxy {url!r} has no host name; use e.g. https://hf-mirror.example")
    return parts.hostname, parts.port or default


def hub_reachable(settings: HubSettings | None = None, timeout: float = PROBE_TIMEOUT_S) -> bool:
    """Whether a TCP connection to the configured endpoint (or to its proxy) opens within `timeout` seconds.

    The whole probe, name resolution included (which a socket timeout does not bound), runs in a worker
    thread that is abandoned at the deadline.

    Args:
        settings: from `hub_settings()` (default: now).
        timeout: seconds.
    Returns:
        True when reachable.
    """
    settings = settings or hub_settings()
    host, port = _host_port(settings.proxy or settings.endpoint)

    def probe():
        socket.create_connection((host, port), timeout=timeout).close()

    pool = concurrent.futures.ThreadPoolExecutor(max_workers=1)
    try:
        pool.submit(probe).result(timeout=timeout)
        return True
    except Exception:
        return False
    finally:
        pool.shutdown(wait=False)


def hub_answers(settings: HubSettings | None = None, timeout: float | None = None) -> bool:
    """Whether the endpoint answers an HTTP request (any status) within `timeout` seconds in all.

    A server that accepts connections and never answers (a dead mirror, a captive proxy) passes
    `hub_reachable`, and huggingface_hub then retries its requests for minutes; this bounds that to `timeout`.
    Only silence counts against the endpoint: an HTTP error status or a TLS failure is an answer (the download
    then reports it).

    Args:
        settings: from `hub_settings()` (default: now); the request goes through its proxy, if any.
        timeout: seconds for the whole request (name resolution, connection, first response line); default
            ANSWER_TIMEOUT_S.
    Returns:
        True when an answer came in time.
    """
    import urllib.error

    timeout = ANSWER_TIMEOUT_S if timeout is None else timeout
    settings = settings or hub_settings()
    url = settings.endpoint + "/api/models"
    proxies = {"http": settings.proxy, "https": settings.proxy} if settings.proxy else {}
    opener = urllib.request.build_opener(urllib.request.ProxyHandler(proxies))

    def ask():
        req = urllib.request.Request(url, method="HEAD", headers={"User-Agent": "fiseclip"})
        try:
            opener.open(req, timeout=timeout).close()
        except urllib.error.HTTPError:  # a status line is an answer
            return True
        except urllib.error.URLError as e:
            if isinstance(e.reason, (socket.timeout, TimeoutError)):
                return False
            return True  # refused, TLS, ...: not silence; the download reports it
        except (socket.timeout, TimeoutError):
            return False
        except Exception:  # noqa: BLE001 - a garbled answer is still an answer
            return True
        return True

    pool = concurrent.futures.ThreadPoolExecutor(max_workers=1)
    try:
        return bool(pool.submit(ask).result(timeout=timeout))
    except concurrent.futures.TimeoutError:
        return False
    finally:
        pool.shutdown(wait=False)


def hub_offline(timeout: float = PROBE_TIMEOUT_S) -> bool:
    """True when the hub cannot be used: declared offline (HF_HUB_OFFLINE) or unreachable within `timeout`."""
    settings = hub_settings()
    return settings.offline or not hub_reachable(settings, timeout)


_session_proxy_env: tuple | None = None


def _hub_imported_offline() -> bool:
    """huggingface_hub's own offline switch: HF_HUB_OFFLINE as it was when huggingface_hub was imported."""
    from huggingface_hub import constants

    is_offline = getattr(constants, "is_offline_mode", None)
    return bool(is_offline() if is_offline is not None else constants.HF_HUB_OFFLINE)


def _refresh_session_for_proxies() -> None:
    """huggingface_hub's HTTP client reads the proxy variables when created: close it (`close_session`, its
    documented way to pick up a changed network setup) when they changed since the last download here."""
    global _session_proxy_env
    proxy_env = tuple(sorted((k, v) for k, v in os.environ.items() if k.lower().endswith("_proxy")))
    if _session_proxy_env is not None and proxy_env != _session_proxy_env:
        try:
            from huggingface_hub import close_session

            close_session()
        except ImportError:  # pragma: no cover - older huggingface_hub
            pass
    _session_proxy_env = proxy_env


class HubDownloadError(Exception):
    """A download that failed in the child process (its message is the child's `Type: first line`)."""


# Run with the environment in force now, so huggingface_hub reads HF_HUB_OFFLINE (and proxies) at its import.
_CHILD_DOWNLOAD = """
import json, sys
a = json.loads(sys.argv[1])
from huggingface_hub import hf_hub_download
last = None
for name in a["names"]:
    try:
        path = hf_hub_download(a["repo"], name, revision=a["revision"], cache_dir=a["cache_dir"],
                               endpoint=a["endpoint"], etag_timeout=a["etag_timeout"])
    except Exception as e:
        text = str(e).strip().splitlines()
        last = type(e).__name__ + ": " + (text[0] if text else "")
        continue
    print(json.dumps({"path": path}))
    sys.exit(0)
print(json.dumps({"error": last or "FileNotFoundError: " + a["repo"]}))
"""


def _download_in_child(repo: str, names: list[str], settings: HubSettings, revision: str) -> str:
    import json
    import subprocess
    import sys

    args = json.dumps({"repo": repo, "names": names, "revision": revision, "cache_dir": settings.cache_dir,
                       "endpoint": settings.endpoint, "etag_timeout": PROBE_TIMEOUT_S * 3})
    # stderr (huggingface_hub's progress bars and warnings) goes to ours; the answer is stdout's last line
    proc = subprocess.run([sys.executable, "-c", _CHILD_DOWNLOAD, args], stdout=subprocess.PIPE, text=True,
                          env=dict(os.environ))
    lines = proc.stdout.strip().splitlines()
    try:
        answer = json.loads(lines[-1]) if lines else {}
    except ValueError:
        answer = {}
    if answer.get("path"):
        return answer["path"]
    raise HubDownloadError(answer.get("error") or f"the download process exited with status {proc.returncode}")


def _candidate_files(filename: str) -> list[str]:
    """open_clip's preference: the safetensors twin of a .bin/.pth file first, then the file itself."""
    filename = filename or HF_WEIGHTS_NAME
    names = [filename]
    if filename == HF_WEIGHTS_NAME:
        names.insert(0, HF_SAFE_WEIGHTS_NAME)
    elif filename.endswith((".bin", ".pth")):
        names.insert(0, filename[:-4] + ".safetensors")
    return names


def cached_hub_file(repo: str, names: list[str], settings: HubSettings, revision: str = "main") -> str | None:
    """The first of `names` present in the local hub cache for `repo` (no network)."""
    from huggingface_hub import hf_hub_download

    for name in names:
        try:
            return hf_hub_download(repo, name, revision=revision, cache_dir=settings.cache_dir, local_files_only=True)
        except Exception:
            continue
    return None


def download_hub_file(repo: str, names: list[str], settings: HubSettings, revision: str = "main") -> str:
    """Download the first of `names` that the endpoint has, into the hub cache; raise the last error.

    Call it only when `settings` say online. huggingface_hub's offline switch is read once, at its import, and
    is never changed here (a process-wide constant: other threads and libraries rely on it). When it was
    imported offline and the environment says online now (a notebook or a test that changed HF_HUB_OFFLINE),
    the download runs in a child process that imports huggingface_hub under the environment of now.
    """
    if _hub_imported_offline():
        return _download_in_child(repo, names, settings, revision)
    from huggingface_hub import hf_hub_download

    _refresh_session_for_proxies()
    last: Exception | None = None
    for name in names:
        try:
            return hf_hub_download(repo, name, revision=revision, cache_dir=settings.cache_dir,
                                   endpoint=settings.endpoint, etag_timeout=PROBE_TIMEOUT_S * 3)
        except Exception as e:  # not there, or network trouble: try the next name, report the last
            last = e
    raise last if last is not None else FileNotFoundError(repo)


def _fix(model: str, tag: str, cache_dir: str | None) -> str:
    return (f"ways out: on a connected machine run `fiseclip fetch-weights --model {model} --pretrained {tag}"
            f"{' --cache-dir ' + cache_dir if cache_dir else ' --cache-dir DIR'}` and copy that folder here "
            f"(then pass --cache-dir DIR), or pass --pretrained /path/to/weights.safetensors")


def _first_line(e: Exception) -> str:
    text = str(e).strip().splitlines()
    if isinstance(e, HubDownloadError):  # already "Type: first line" of the child's error
        return text[0] if text else ""
    return f"{type(e).__name__}: {text[0] if text else ''}"


def _get(repo: str, names: list[str], model: str, tag: str, cache_dir: str | None, optional: bool = False):
    """Cache first, then (if allowed and reachable) the endpoint. None for a missing optional file."""
    settings = hub_settings(cache_dir)
    path = cached_hub_file(repo, names, settings)
    if path:
        return path
    where = f"hub cache {settings.cache_dir} for {repo}"
    if settings.offline or not hub_reachable(settings):
        if optional:
            return None
        why = "HF_HUB_OFFLINE is set" if settings.offline else (
            f"{settings.endpoint} is unreachable" + (f" through proxy {settings.proxy}" if settings.proxy else ""))
        raise WeightsUnavailableError(
            f"weights for {model} (pretrained={tag!r}) are not cached (looked in: {where}) and the hub is offline "
            f"({why}); {_fix(model, tag, cache_dir)}")
    if not hub_answers(settings):  # else huggingface_hub retries a silent server for minutes
        if optional:
            return None
        via = f" through proxy {settings.proxy}" if settings.proxy else ""
        raise WeightsUnavailableError(
            f"weights for {model} (pretrained={tag!r}) are not cached (looked in: {where}) and {settings.endpoint}"
            f"{via} accepts connections but sent no answer within {ANSWER_TIMEOUT_S:g} s (check HF_ENDPOINT and "
            f"proxies); {_fix(model, tag, cache_dir)}")
    try:
        return download_hub_file(repo, names, settings)
    except Exception as e:
        if optional:
            return None
        raise WeightsUnavailableError(f"download of {model} (pretrained={tag!r}) from {settings.endpoint}/{repo} "
                                      f"failed ({_first_line(e)}); {_fix(model, tag, cache_dir)}") from None


def tag_weights(model: str, tag: str, cache_dir: str | None = None) -> tuple[str, dict]:
    """The local path of an open_clip tag's weights (downloading them if needed and allowed) and its config.

    Args:
        model: open_clip model name.
        tag: pretrained tag (e.g. 'openai', 'laion2b_s34b_b88k').
        cache_dir: hub cache folder (default: HF_HUB_CACHE / HF_HOME from the environment).
    Returns:
        (path, pretrained config).
    """
    import open_clip

    cfg = open_clip.get_pretrained_cfg(model, tag)
    if not cfg:
        known = open_clip.list_pretrained_tags_by_model(model)
        raise FiseclipError(
            f"pretrained {tag!r} is neither a file nor a known tag for {model} (known tags: {known or 'none'}); "
            f"pass a tag, hf-hub:org/name, a local .safetensors/.pt file, or 'none' for random weights")
    if cfg.get("file"):
        return cfg["file"], cfg
    hub = cfg.get("hf_hub", "")
    if hub:
        repo, fname = os.path.split(hub)  # open_clip's convention: 'org/name/' means the default file name
        return _get(repo, _candidate_files(fname), model, tag, cache_dir), cfg
    url = cfg.get("url", "")
    path = Path(cache_dir or Path("~/.cache/clip").expanduser()) / os.path.basename(url)
    if path.is_file():
        return str(path), cfg
    settings = hub_settings(cache_dir)
    if settings.offline:
        raise WeightsUnavailableError(f"weights for {model} (pretrained={tag!r}) are not cached (looked in: "
                                      f"{path}) and HF_HUB_OFFLINE is set; {_fix(model, tag, cache_dir)}")
    try:
        return open_clip.pretrained.download_pretrained_from_url(url, cache_dir=cache_dir), cfg
    except Exception as e:
        raise WeightsUnavailableError(f"download of {model} (pretrained={tag!r}) from {url} failed "
                                      f"({_first_line(e)}); {_fix(model, tag, cache_dir)}") from None


def hf_hub_weights(model: str, pretrained: str, cache_dir: str | None = None) -> tuple[str, dict]:
    """Weights and preprocessing of `pretrained='hf-hub:org/name'`.

    Args:
        model: the open_clip model name the weights are for.
        pretrained: 'hf-hub:org/name'.
        cache_dir: hub cache folder.
    Returns:
        (weights path, config): config holds the repository's `open_clip_config.json` preprocessing (mean,
        std, interpolation) and `quick_gelu` when the repository has that file, else is empty.
    """
    import json

    repo = pretrained[len(HF_HUB_PREFIX):].strip("/")
    if repo.count("/") != 1:
        raise FiseclipError(f"pretrained {pretrained!r}: expected hf-hub:org/name")
    path = _get(repo, [HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME], model, pretrained, cache_dir)
    cfg: dict = {}
    conf = _get(repo, [HF_CONFIG_NAME], model, pretrained, cache_dir, optional=True)
    if conf:
        try:
            data = json.loads(Path(conf).read_text())
            cfg.update({k: v for k, v in (data.get("preprocess_cfg") or {}).items()
                        if k in ("mean", "std", "interpolation")})
            if "quick_gelu" in (data.get("model_cfg") or {}):
                cfg["quick_gelu"] = bool(data["model_cfg"]["quick_gelu"])
        except (OSError, ValueError, AttributeError):
            raise FiseclipError(f"{conf} (the open_clip_config.json of {repo}) is not valid JSON") from None
    return path, cfg


def fetch_weights(model: str, pretrained: str, cache_dir: str | None = None) -> str:
    """Download a tag's (or hf-hub:org/name's) weights into the cache; run it on a connected machine.

    Args:
        model: open_clip model name.
        pretrained: tag or hf-hub:org/name.
        cache_dir: hub cache folder (default from the environment).
    Returns:
        The local path of the weights.
    """
    register_model_configs()
    if str(pretrained).startswith(HF_HUB_PREFIX):
        return hf_hub_weights(model, pretrained, cache_dir)[0]
    return tag_weights(model, pretrained, cache_dir)[0]


def register_pretrained(model: str, tag: str, hf_hub: str = "", url: str = "", **cfg) -> None:
    """Make `tag` a pretrained tag of `model` in open_clip for this process (e.g. a model on a private hub).

    Args:
        model: open_clip model name (e.g. 'fiseclip-tiny').
        tag: the new tag (open_clip lower-cases it and maps '-' to '_').
        hf_hub: 'org/name/' (default file name) or 'org/name/file.safetensors'.
        url: a plain download URL instead.
        cfg: mean, std, interpolation, quick_gelu, ... as in open_clip's pretrained configs.
    Undo with `unregister_pretrained` (or use `pretrained_tag` as a context manager).
    """
    from open_clip import pretrained as P

    entry = {"url": url, "hf_hub": hf_hub, **cfg}
    P._PRETRAINED.setdefault(model, {})[P._clean_tag(tag)] = entry


def unregister_pretrained(model: str, tag: str) -> None:
    """Remove a tag added with `register_pretrained` (no-op if absent)."""
    from open_clip import pretrained as P

    tags = P._PRETRAINED.get(model, {})
    tags.pop(P._clean_tag(tag), None)
    if not tags:
        P._PRETRAINED.pop(model, None)


@contextlib.contextmanager
def pretrained_tag(model: str, tag: str, **kw):
    """`register_pretrained` for the duration of a `with` block (what was there before is restored)."""
    from open_clip import pretrained as P

    had_model = model in P._PRETRAINED
    old = P._PRETRAINED.get(model, {}).get(P._clean_tag(tag))
    register_pretrained(model, tag, **kw)
    try:
        yield
    finally:
        if old is not None:
            P._PRETRAINED[model][P._clean_tag(tag)] = old
        elif had_model:
            P._PRETRAINED[model].pop(P._clean_tag(tag), None)
        else:
            unregister_pretrained(model, tag)
