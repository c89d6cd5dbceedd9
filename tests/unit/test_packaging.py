"""pyproject's explicit package list names every package of the pack (a new one left out installs
without it outside editable mode), and no two test files share a basename (pytest collects by it)."""
import re
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_pyproject_lists_every_package():
    listed = set(re.search(r"packages = \[(.*?)\]", (ROOT / "pyproject.toml").read_text()).group(1).replace('"', "").replace(" ", "").split(","))
    found = {"sd_accel" + "".join("." + p for p in init.parent.relative_to(ROOT).parts)
             for init in ROOT.rglob("__init__.py")
             if not init.relative_to(ROOT).parts[0].startswith((".", "tests", "scripts", "web", "build"))}
    assert found == listed, f"missing from pyproject: {sorted(found - listed)}; listed but absent: {sorted(listed - found)}"


def test_test_files_have_distinct_basenames():
    names = Counter(p.name for p in (ROOT / "tests").rglob("test_*.py"))
    assert not [n for n, k in names.items() if k > 1], "two test files share a basename; pytest's rootdir-less collection breaks on it"
