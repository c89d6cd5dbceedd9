"""The webui test set-up: docs/webui.md shows exactly the commands the harness names when something is missing."""
import re
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests" / "integration"))
import webui_harness as harness  # noqa: E402

KINDS = ("a1111", "forge", "neo")


def doc_commands() -> set[str]:
    """Every command line of docs/webui.md's bash blocks, continuation lines joined."""
    text = (REPO / "docs" / "webui.md").read_text()
    lines = set()
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in re.sub(r"\\\n\s*", "", block).splitlines():
            if line.strip():
                lines.add(line.strip())
    return lines


@pytest.mark.parametrize("kind", KINDS)
def test_docs_show_the_harness_set_up(kind):
    missing = [line for line in harness.setup_lines(kind) if line not in doc_commands()]
    assert not missing, f"docs/webui.md lacks these {kind} set-up lines: {missing}"


@pytest.mark.parametrize("kind", KINDS)
def test_without_a_webui_the_skip_names_the_set_up(kind, monkeypatch):
    monkeypatch.delenv(harness.SETUP[kind]["env"], raising=False)
    reason = harness.skip_reason(kind)
    assert harness.SETUP[kind]["env"] in reason
    assert all(line in reason for line in harness.setup_lines(kind))


def test_a_missing_repository_names_its_clone(tmp_path, monkeypatch):
    (tmp_path / "modules").mkdir()
    (tmp_path / "modules" / "initialize.py").write_text("")
    monkeypatch.setenv("WEBUI_FORGE_PATH", str(tmp_path))
    reason = harness.skip_reason("forge")
    assert "repositories/huggingface_guess is missing" in reason
    assert f"git clone https://github.com/lllyasviel/huggingface_guess {tmp_path}/repositories/huggingface_guess" in reason
    assert "checkout 84826248b49bb7ca754c73293299c4d4e23a548d" in reason


def test_not_a_webui_names_the_clone(tmp_path, monkeypatch):
    monkeypatch.setenv("WEBUI_NEO_PATH", str(tmp_path))
    assert "git clone --depth 1 --branch neo" in harness.skip_reason("neo")


def test_a_packaged_neo_is_found_under_webui(tmp_path, monkeypatch):
    (tmp_path / "webui" / "modules").mkdir(parents=True)
    monkeypatch.setenv("WEBUI_NEO_PATH", str(tmp_path))
    assert harness.root("neo") == tmp_path / "webui"


def test_pins_come_from_the_pip_lines_and_neos_requirements(tmp_path):
    assert harness.pins("a1111")["peft"] == "0.6.2"  # the machine's newer peft breaks diffusers' import in the A1111 venv
    assert "tokenizers" not in harness.pins("forge")  # transformers 4.46.1 brings its own
    (tmp_path / "requirements.txt").write_text("setuptools==69.5.1\ntransformers==4.56.2\naudioop-lts==0.2.2;python_version>=\"3.13\"\ntorch\n")
    neo = harness.pins("neo", tmp_path)
    assert neo["transformers"] == "4.56.2" and neo["torch"] == "2.13.0" and "setuptools" not in neo and "audioop-lts" not in neo


def test_wrong_versions_are_named_with_the_install_command(tmp_path, monkeypatch):
    # This Python (CI's) has none of the webui pins: the reason lists what differs and the pip line that fixes it.
    (tmp_path / "modules").mkdir()
    (tmp_path / "modules" / "initialize.py").write_text("")
    (tmp_path / "requirements.txt").write_text("transformers==0.0.1\n")
    monkeypatch.setenv("WEBUI_NEO_PATH", str(tmp_path))
    monkeypatch.setattr(harness, "_MODULES", ())
    reason = harness.skip_reason("neo")
    assert "transformers" in reason and "expected 0.0.1" in reason
    assert ".hosts/venv-neo/bin/pip install -c constraints-cpu.txt torch==2.13.0 torchvision==0.28.0" in reason


def test_a_forge_venv_without_sentencepiece_skips_with_the_pip_line(tmp_path, monkeypatch):
    """Forge's bundled gguf imports sentencepiece at start-up: without it every Forge test would error."""
    (tmp_path / "modules").mkdir()
    (tmp_path / "modules" / "initialize.py").write_text("")
    (tmp_path / "repositories" / "huggingface_guess" / "huggingface_guess").mkdir(parents=True)
    monkeypatch.setenv("WEBUI_FORGE_PATH", str(tmp_path))
    monkeypatch.setattr(harness, "_MODULES", ())
    real = harness.importlib.util.find_spec
    monkeypatch.setattr(harness.importlib.util, "find_spec", lambda name, *a: None if name == "sentencepiece" else real(name, *a))
    reason = harness.skip_reason("forge")
    assert "lacks sentencepiece" in reason and ".hosts/venv-forge/bin/pip install -c constraints-cpu.txt sentencepiece" in reason
