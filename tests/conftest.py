import os

# Offline by construction: an offline pretrained='openai' then fails in milliseconds instead of retrying.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")
# Passive OpenMP waiting (as fiseclip_lib sets it): tests share 2 cores with other processes.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# Never touch the user's feature cache from tests.
os.environ["FISECLIP_FEATURE_CACHE"] = os.path.join(__import__("tempfile").mkdtemp(prefix="fiseclip-test-cache-"))

import pytest  # noqa: E402


def _share_cores_between_workers() -> None:
    """Under pytest-xdist (`-n auto`, the default in pyproject.toml) each worker gets its share of the CPUs for
    torch's intra-op threads: two workers with two threads each on two cores would oversubscribe them."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1") or 1)
    if workers > 1:
        import torch

        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        torch.set_num_threads(max(1, cpus // workers))


_share_cores_between_workers()

from helpers import kill_fresh_processes, make_mvtec_tree, start_fresh_server  # noqa: E402


FRESH_NAMES = {"Fresh", "start_fresh_server"}  # helpers' names that start a fresh process (or its server)


def _names(code) -> set:
    """The global names a function's code reads, nested functions included."""
    found = set(code.co_names)
    for const in code.co_consts:
        if hasattr(const, "co_names"):
            found |= _names(const)
    return found


def _starts_fresh(fn, seen: set) -> bool:
    """Whether `fn`, or a function of the tests it calls (followed through its module's globals), names a helper
    that starts a fresh process."""
    fn = getattr(fn, "__wrapped__", fn)
    code = getattr(fn, "__code__", None)
    if code is None or code in seen:
        return False
    seen.add(code)
    names = _names(code)
    if names & FRESH_NAMES:
        return True
    module_globals = getattr(fn, "__globals__", {})
    return any(_starts_fresh(module_globals[n], seen) for n in names
               if callable(module_globals.get(n)) and getattr(module_globals[n], "__module__", "").startswith("test_"))


def _uses_fresh(item) -> bool:
    """Whether a test or one of its fixtures starts a fresh process (`_starts_fresh`)."""
    funcs = [getattr(item, "function", None)]
    info = getattr(item, "_fixtureinfo", None)
    if info is not None:
        funcs += [d.func for defs in info.name2fixturedefs.values() for d in defs]
    seen: set = set()
    return any(_starts_fresh(fn, seen) for fn in funcs if fn is not None)


def pytest_collection_finish(session):
    """Start the server that fresh processes fork from (helpers.Fresh) when a selected test uses one: it imports
    the library in its own process while the first tests run. Only then: `-m "not slow"`, which deselects the
    tests that need fresh processes, does not pay for the server's imports (a test that still needs it starts it
    on first use)."""
    if not session.config.option.collectonly and any(_uses_fresh(item) for item in session.items):
        start_fresh_server()


def pytest_sessionfinish(session):
    """Stop that server (at once: it may still be importing when the selected tests did not need it) and reap
    it: no process outlives the session, and its work counts as the session's (CPU time of the test run).
    Then remove this process's scratch feature cache."""
    import shutil
    import signal
    from multiprocessing import forkserver

    kill_fresh_processes()  # any still running (the child of a test that failed before waiting for it)
    server = forkserver._forkserver
    if server._forkserver_pid is not None:
        os.kill(server._forkserver_pid, signal.SIGKILL)
    server._stop()  # closes its pipe and waits for it, as CPython's own tests do; a no-op when never started
    shutil.rmtree(os.environ["FISECLIP_FEATURE_CACHE"], ignore_errors=True)  # this process's scratch cache


@pytest.fixture(scope="session")
def tiny_encoder():
    from fiseclip_lib.encoder import load_encoder

    return load_encoder("fiseclip-tiny", "none", image_size=112, device="cpu")


@pytest.fixture(scope="session")
def small_demo(tmp_path_factory):
    """A small demo set (real textures, injected defects) for fast end-to-end tests."""
    from fiseclip_lib.evaluation.demo import build_demo

    return build_demo(tmp_path_factory.mktemp("demo") / "small", n_good=8, n_defect=5, n_train=1, size=64)


@pytest.fixture(scope="session")
def default_demo(tmp_path_factory):
    """The default demo set (what README command 1 builds), built once per session; tests only read it."""
    from fiseclip_lib.evaluation.demo import build_demo

    return build_demo(tmp_path_factory.mktemp("demo") / "default")


@pytest.fixture
def mvtec_tree(tmp_path):
    return make_mvtec_tree(tmp_path / "mvtec")


@pytest.fixture
def no_network(monkeypatch):
    """Any connection attempt fails the test (a dataset reader or anomalib never downloads)."""
    import socket

    def refuse(*args, **kwargs):
        raise AssertionError("a network connection was attempted (a download?)")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
