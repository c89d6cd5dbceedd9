"""The extension's scripts reach SD Accel only through accel_core.hosts.webui: every name they use is there.

The scripts import `modules.*` (the webui) at the top, so they cannot be imported here; their
`webui.<name>` uses are read from the source instead. This catches a name moved between the
webui_* modules without a re-export, which otherwise shows only when a real webui boots.
"""
import ast
from pathlib import Path

import pytest

from sd_accel.accel_core.hosts import webui

SCRIPTS = sorted((Path(__file__).resolve().parents[2] / "scripts").glob("*.py"))


def _uses(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    return {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name) and n.value.id == "webui"}


@pytest.mark.parametrize("path", SCRIPTS, ids=lambda p: p.name)
def test_every_name_a_script_uses_is_on_the_face(path):
    used = _uses(path)
    assert used, f"{path.name} no longer uses accel_core.hosts.webui; update this test"
    missing = sorted(n for n in used if not hasattr(webui, n))
    assert not missing, f"{path.name} uses webui.{', webui.'.join(missing)}, which accel_core/hosts/webui.py does not export"


def test_all_lists_only_what_is_there():
    assert [n for n in webui.__all__ if not hasattr(webui, n)] == []
    assert set().union(*map(_uses, SCRIPTS)) <= set(webui.__all__)  # the face says what it offers
