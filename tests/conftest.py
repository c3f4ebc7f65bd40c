import os

# Offline by construction: an offline pretrained='openai' then fails in milliseconds instead of retrying.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")
# Passive OpenMP waiting (as fiseclip_lib sets it): tests share 2 cores with other processes.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# Never touch the user's feature cache from tests.
os.environ["FISECLIP_FEATURE_CACHE"] = os.path.join(__import__("tempfile").mkdtemp(prefix="fiseclip-test-cache-"))

import pytest  # noqa: E402

from helpers import make_mvtec_tree  # noqa: E402


@pytest.fixture(scope="session")
def tiny_encoder():
    from fiseclip_lib.encoder import load_encoder

    return load_encoder("fiseclip-tiny", "none", image_size=112, device="cpu")


@pytest.fixture(scope="session")
def small_demo(tmp_path_factory):
    """A small demo set (real textures, injected defects) for fast end-to-end tests."""
    from fiseclip_lib.demo import build_demo

    return build_demo(tmp_path_factory.mktemp("demo") / "small", n_good=8, n_defect=5, n_train=1, size=64)


@pytest.fixture
def mvtec_tree(tmp_path):
    return make_mvtec_tree(tmp_path / "mvtec")
