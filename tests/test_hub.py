"""Weights from the hub, offline: a tiny HTTP server on 127.0.0.1 plays HF_ENDPOINT and serves files in the hub's
layout (`/{repo}/resolve/{revision}/{file}` with X-Repo-Commit, ETag and Content-Length, as huggingface_hub's
`hf_hub_download` expects); a pre-seeded hub cache stands in for a classroom laptop that fetched ViT-B-16 once."""
import hashlib
import http.server
import io
import json
import os
import threading
import time
from pathlib import Path

import huggingface_hub.constants  # imported now, under conftest's HF_HUB_OFFLINE=1: its constants say offline from here on
import numpy as np
import pytest
import torch

from fiseclip_lib.encoder import (HF_HUB_PREFIX, hub_reachable, hub_settings, load_encoder, pretrained_tag)
from fiseclip_lib.errors import WeightsUnavailableError

COMMIT = hashlib.sha1(b"fiseclip-test").hexdigest()
MAX_REQUESTS = 200  # the server refuses (and stops) past this: no request loop can run unbounded
LIFETIME_S = 120  # and it stops itself after this long whatever happens


class FakeHub:
    """A thread-served hub endpoint holding {(repo, file): bytes} at revision main = COMMIT."""

    def __init__(self, files: dict):
        self.files = files
        self.requests: list[tuple[str, str]] = []
        hub = self

        class Handler(http.server.BaseHTTPRequestHandler):
            timeout = 10  # socket timeout per connection

            def log_message(self, *args):
                pass

            def _answer(self, body: bool):
                hub.requests.append((self.command, self.path))
                if len(hub.requests) > MAX_REQUESTS:
                    self.send_error(503)
                    threading.Thread(target=hub.stop, daemon=True).start()
                    return
                parts = self.path.split("?")[0].strip("/").split("/")
                data = None
                if len(parts) >= 5 and parts[2] == "resolve" and parts[3] in ("main", COMMIT):
                    data = hub.files.get(("/".join(parts[:2]), "/".join(parts[4:])))
                if data is None:
                    self.send_response(404)
                    self.send_header("X-Error-Code", "EntryNotFound")
                    self.send_header("X-Repo-Commit", COMMIT)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                self.send_response(200)
                self.send_header("X-Repo-Commit", COMMIT)
                self.send_header("ETag", '"%s"' % hashlib.sha256(data).hexdigest())
                self.send_header("Content-Length", str(len(data)))
                self.send_header("Content-Type", "application/octet-stream")
                self.end_headers()
                if body:
                    self.wfile.write(data)

            def do_HEAD(self):
                self._answer(body=False)

            def do_GET(self):
                self._answer(body=True)

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()
        self.watchdog = threading.Timer(LIFETIME_S, self.stop)
        self.watchdog.daemon = True
        self.watchdog.start()
        self.stopped = False

    def stop(self):
        if not self.stopped:
            self.stopped = True
            self.watchdog.cancel()
            self.server.shutdown()
            self.server.server_close()

    def gets(self, name: str) -> int:
        return sum(1 for m, p in self.requests if m == "GET" and p.endswith("/" + name))


def _tiny_weights(seed: int) -> dict:
    sd = load_encoder("fiseclip-tiny", "none", image_size=112, device="cpu", seed=seed).model.state_dict()
    return {k: v.contiguous() for k, v in sd.items()}


def _safetensors_bytes(sd: dict) -> bytes:
    from safetensors.torch import save

    return save(sd)


@pytest.fixture
def hub_env(tmp_path, monkeypatch):
    """A fresh HF_HOME, online, no proxies; huggingface_hub's import-time constants are left as they were."""
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    for name in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "TRANSFORMERS_OFFLINE", "HTTP_PROXY", "HTTPS_PROXY",
                 "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy", "NO_PROXY", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    return tmp_path / "hf" / "hub"


@pytest.fixture
def fake_hub():
    hubs = []

    def start(files):
        hubs.append(FakeHub(files))
        return hubs[-1]

    yield start
    for h in hubs:
        h.stop()


def test_tag_downloads_through_the_endpoint_then_loads_offline_identically(hub_env, fake_hub, monkeypatch):
    sd = _tiny_weights(seed=11)
    hub = fake_hub({("fiseclip-test/tiny-clip", "open_clip_model.safetensors"): _safetensors_bytes(sd)})
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    # huggingface_hub read HF_HUB_OFFLINE=1 and no HF_ENDPOINT at import; the environment says otherwise now
    assert huggingface_hub.constants.HF_HUB_OFFLINE and huggingface_hub.constants.ENDPOINT != hub.url
    x = torch.randn(2, 3, 112, 112)
    mean, std = (0.45, 0.44, 0.43), (0.21, 0.22, 0.23)
    with pretrained_tag("fiseclip-tiny", "hub-test", hf_hub="fiseclip-test/tiny-clip/", mean=mean, std=std,
                        interpolation="bilinear"):
        online = load_encoder("fiseclip-tiny", "hub-test", image_size=112, device="cpu", seed=0)
        snap = hub_env / "models--fiseclip-test--tiny-clip" / "snapshots" / COMMIT / "open_clip_model.safetensors"
        assert snap.is_file(), "fetched into the fresh HF_HOME in the hub's layout"
        assert hub.gets("open_clip_model.safetensors") == 1
        assert (online.mean, online.std, online.interpolation) == (mean, std, "bilinear")
        for k, v in online.model.state_dict().items():
            assert torch.equal(v, sd[k]), k
        a = online(x, layers=[2, 4], restore="clearclip")
        hub.stop()
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
        n = len(hub.requests)
        offline = load_encoder("fiseclip-tiny", "hub-test", image_size=112, device="cpu", seed=0)
        assert len(hub.requests) == n
    b = offline(x, layers=[2, 4], restore="clearclip")
    assert offline.identity() == online.identity()
    for l in a.layers:
        assert torch.equal(a.layers[l], b.layers[l])
    assert torch.equal(a.dense, b.dense) and torch.equal(a.global_embedding, b.global_embedding)


def test_hf_hub_name_with_config_and_bin_fallback(hub_env, fake_hub, monkeypatch):
    sd = _tiny_weights(seed=12)
    buf = io.BytesIO()
    torch.save(sd, buf)
    config = {"model_cfg": {"quick_gelu": True},
              "preprocess_cfg": {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5], "interpolation": "bicubic"}}
    hub = fake_hub({("org-x/tiny", "open_clip_pytorch_model.bin"): buf.getvalue(),
                    ("org-x/tiny", "open_clip_config.json"): json.dumps(config).encode()})
    monkeypatch.setenv("HF_ENDPOINT", hub.url + "/")  # a trailing slash is fine
    enc = load_encoder("fiseclip-tiny", HF_HUB_PREFIX + "org-x/tiny", image_size=112, device="cpu")
    assert enc.pretrained and enc.quick_gelu and enc.mean == (0.5, 0.5, 0.5) and enc.std == (0.5, 0.5, 0.5)
    assert hub.gets("open_clip_pytorch_model.bin") == 1 and hub.gets("open_clip_model.safetensors") == 0
    x = torch.randn(1, 3, 112, 112)
    a = enc(x, layers=[4], restore="vv")
    hub.stop()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    again = load_encoder("fiseclip-tiny", HF_HUB_PREFIX + "org-x/tiny", image_size=112, device="cpu")
    assert again.identity() == enc.identity()
    b = again(x, layers=[4], restore="vv")
    assert torch.equal(a.dense, b.dense) and torch.equal(a.layers[4], b.layers[4])
    with pytest.raises(WeightsUnavailableError, match="HF_HUB_OFFLINE is set") as info:
        load_encoder("fiseclip-tiny", HF_HUB_PREFIX + "org-x/other", image_size=112, device="cpu")
    assert "\n" not in str(info.value)


def test_probe_uses_the_configured_endpoint_and_proxy_and_is_time_bounded(hub_env, fake_hub, monkeypatch):
    hub = fake_hub({})
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    s = hub_settings()
    assert s.endpoint == hub.url and s.cache_dir == str(hub_env) and not s.offline and s.proxy is None
    assert hub_reachable(timeout=2)
    # a proxy that does not answer: the probe goes to the proxy, not the endpoint
    closed = FakeHub({})
    closed.stop()
    monkeypatch.setenv("HTTP_PROXY", closed.url)
    assert hub_settings().proxy == closed.url
    assert not hub_reachable(timeout=2)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    assert hub_settings().proxy is None and hub_reachable(timeout=2)
    monkeypatch.delenv("NO_PROXY")
    monkeypatch.delenv("HTTP_PROXY")
    hub.stop()
    assert not hub_reachable(timeout=2)
    monkeypatch.setenv("HF_ENDPOINT", "https://fiseclip-no-such-host.invalid")
    t0 = time.time()
    assert not hub_reachable(timeout=1.0)
    assert time.time() - t0 < 2.5
    # not cached, hub unreachable: one line, fast, naming the endpoint
    t0 = time.time()
    with pytest.raises(WeightsUnavailableError, match="unreachable") as info:
        load_encoder("fiseclip-tiny", HF_HUB_PREFIX + "org-x/tiny", image_size=112, device="cpu")
    assert time.time() - t0 < 8 and "fiseclip-no-such-host.invalid" in str(info.value)


@pytest.mark.slow
def test_classroom_params_load_offline_from_a_preseeded_hub_cache(hub_env, monkeypatch):
    """params/classroom.yaml (ViT-B-16, openai, 224) on a laptop that fetched the weights once: the hub cache
    is seeded in the real layout with RANDOM TENSORS of the right shapes (not the OpenAI weights), then the
    encoder loads with HF_HUB_OFFLINE=1 and takes its preprocessing and QuickGELU from open_clip's config."""
    import open_clip
    from safetensors.torch import save_file

    from fiseclip_lib.cli import NOTEBOOK_KEYS, _load_params
    from fiseclip_lib.config import FiseConfig
    from fiseclip_lib.core.detector import Detector

    params = _load_params(Path(__file__).resolve().parents[1] / "params" / "classroom.yaml")
    opts = {k: v for k, v in params.items() if k not in NOTEBOOK_KEYS | {"dataset", "root", "categories", "out"}}
    cfg = FiseConfig.from_dict(opts)
    assert (cfg.model, cfg.pretrained, cfg.image_size) == ("ViT-B-16", "openai", 224)
    pcfg = open_clip.get_pretrained_cfg("ViT-B-16", "openai")
    repo, fname = os.path.split(pcfg["hf_hub"])
    assert fname == ""  # open_clip's default file names; the safetensors one is tried first
    with torch.device("meta"):  # shapes only: no 600 MB of initialisation
        shapes = open_clip.create_model("ViT-B-16", pretrained=None, device="meta").state_dict()
    gen = torch.Generator().manual_seed(0)
    random_tensors = {k: (torch.randn(v.shape, generator=gen) * 0.02).to(torch.float16) for k, v in shapes.items()}
    storage = hub_env / ("models--" + repo.replace("/", "--"))
    snap = storage / "snapshots" / COMMIT
    snap.mkdir(parents=True)
    save_file(random_tensors, str(snap / "open_clip_model.safetensors"))
    (storage / "refs").mkdir()
    (storage / "refs" / "main").write_text(COMMIT)
    del random_tensors
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    det = Detector(cfg.replace(device="cpu"))
    enc = det.encoder
    assert enc.pretrained and enc.weights == "openai" and enc.weights_id.startswith("sha256:")
    assert enc.mean == tuple(pcfg["mean"]) and enc.std == tuple(pcfg["std"])
    assert enc.interpolation == pcfg["interpolation"] and enc.quick_gelu is True is pcfg["quick_gelu"]
    assert type(enc.model.visual.transformer.resblocks[0].mlp.gelu).__name__ == "QuickGELU"
    assert enc.grid == (14, 14) and enc.default_layers == (3, 6, 9, 12)
    f = enc(enc.preprocess([np.zeros((30, 40, 3), np.uint8)]), layers=[12], restore="clearclip")
    assert f.dense.shape == (1, 196, 512) and torch.isfinite(f.dense).all()


def test_downloads_never_change_huggingface_hub_constants(hub_env, fake_hub, monkeypatch):
    """huggingface_hub's offline switch is its import-time constant, shared by every thread and library of the
    process: a download here never flips it, not even for the duration of the call. Imported offline with the
    environment online now, the download runs in a child process; imported online, in this one."""
    import subprocess

    from fiseclip_lib.encoder import hub as hub_module

    sd = _tiny_weights(seed=13)
    files = {("org-c/tiny", "open_clip_model.safetensors"): _safetensors_bytes(sd)}
    hub = fake_hub(files)
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    assert huggingface_hub.constants.HF_HUB_OFFLINE  # imported under conftest's HF_HUB_OFFLINE=1
    seen, stop = set(), threading.Event()

    def watch():
        while not stop.is_set():
            seen.add(huggingface_hub.constants.HF_HUB_OFFLINE)
            time.sleep(0.0005)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    children = []
    real_run = subprocess.run
    monkeypatch.setattr(subprocess, "run", lambda *a, **kw: children.append(a) or real_run(*a, **kw))
    try:
        enc = load_encoder("fiseclip-tiny", HF_HUB_PREFIX + "org-c/tiny", image_size=112, device="cpu")
    finally:
        stop.set()
        watcher.join()
    assert seen == {True}, "huggingface_hub's offline constant was changed during the download"
    assert len(children) == 2  # the weights, then the optional open_clip_config.json (not on this hub)
    assert hub.gets("open_clip_model.safetensors") == 1
    for k, v in enc.model.state_dict().items():
        assert torch.equal(v, sd[k]), k
    # a download that fails in the child is one line naming the endpoint and huggingface_hub's error
    with pytest.raises(WeightsUnavailableError, match=r"from http://127\.0\.0\.1:\d+/org-c/missing failed "
                                                      r"\(\w+: ") as info:
        load_encoder("fiseclip-tiny", HF_HUB_PREFIX + "org-c/missing", image_size=112, device="cpu")
    assert "\n" not in str(info.value) and len(children) == 3
    # huggingface_hub imported online (its constant False): the download runs here, without a child
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    other = fake_hub({("org-d/tiny", "open_clip_model.safetensors"): _safetensors_bytes(sd)})
    monkeypatch.setenv("HF_ENDPOINT", other.url)
    assert hub_module.download_hub_file("org-d/tiny", ["open_clip_model.safetensors"], hub_settings()).endswith(
        "open_clip_model.safetensors")
    assert len(children) == 3 and other.gets("open_clip_model.safetensors") == 1
    assert huggingface_hub.constants.HF_HUB_OFFLINE is False


def test_an_endpoint_that_accepts_and_never_answers_is_one_line_within_the_bound(hub_env, monkeypatch):
    import socket

    import fiseclip_lib.encoder.hub as hub_mod

    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)  # the kernel completes the handshake; nobody ever reads or writes
    try:
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{silent.getsockname()[1]}")
        monkeypatch.setattr(hub_mod, "ANSWER_TIMEOUT_S", 1.5)
        assert hub_mod.hub_reachable(timeout=2)  # the TCP probe alone is fooled
        t0 = time.time()
        assert not hub_mod.hub_answers()
        assert 1.0 < time.time() - t0 < 4
        t0 = time.time()
        with pytest.raises(WeightsUnavailableError, match="sent no answer within 1.5 s") as info:
            load_encoder("fiseclip-tiny", HF_HUB_PREFIX + "org-x/silent", image_size=112, device="cpu")
        assert time.time() - t0 < 8  # was > 150 s of retries
        assert "\n" not in str(info.value) and str(silent.getsockname()[1]) in str(info.value)
    finally:
        silent.close()


def test_an_endpoint_that_answers_with_an_error_status_counts_as_answering(hub_env, fake_hub, monkeypatch):
    import fiseclip_lib.encoder.hub as hub_mod

    hub = fake_hub({})  # answers 404 for everything
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    assert hub_mod.hub_answers(timeout=3)
    hub.stop()
    assert hub_mod.hub_answers(timeout=3)  # refused is not silence: the download names that error
