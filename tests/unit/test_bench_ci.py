"""What CI installs for the tests that compare with a reference implementation."""
import os
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_the_test_extra_installs_the_deepcache_reference():
    extra = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["test"]
    assert any(d.replace(" ", "").startswith("DeepCache") for d in extra), extra


@pytest.mark.skipif(not os.environ.get("CI"), reason="CI only: there, a missing reference package is a failure, not a skip")
def test_ci_has_the_deepcache_reference():
    # Without it test_deepcache.py::test_matches_the_deepcache_package skips silently.
    import DeepCache

    assert hasattr(DeepCache, "DeepCacheSDHelper")
