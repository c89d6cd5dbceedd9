"""The README and docs/ as a reader meets them: every relative link and anchor resolves, every
repository path they name exists, and the README's set-up and test commands are the ones CI runs."""
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]
README_MAX_LINES = 300

_FENCE = re.compile(r"^(```|~~~).*?^\1[ \t]*$", re.S | re.M)
_LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")
_SPAN = re.compile(r"`([^`\n]+)`")


def _prose(text: str) -> str:
    """The text outside fenced code blocks (a `# comment` in a shell block is no heading)."""
    return _FENCE.sub("", text)


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*_]|\[([^\]]*)\]\([^)]*\)", lambda m: m.group(1) or "", heading.strip()).lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for line in _prose(page.read_text(encoding="utf-8")).splitlines():
        m = re.match(r"#{1,6} (.+)", line)
        if not m:
            continue
        slug = _slug(m.group(1))
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        out.add(slug if n == 0 else f"{slug}-{n}")
    return out


def _links(page: Path):
    for target in _LINK.findall(_prose(page.read_text(encoding="utf-8"))):
        if not re.match(r"[a-z][a-z0-9+.-]*:", target):  # skip https:, mailto:
            yield target


def test_readme_is_a_guide_not_a_log():
    n = len(README.read_text(encoding="utf-8").splitlines())
    assert n <= README_MAX_LINES, f"README.md has {n} lines, expected at most {README_MAX_LINES}: move detail to a docs/ page"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page):
    broken = []
    for target in _links(page):
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            broken.append(f"{target} (no file {dest.relative_to(ROOT) if ROOT in dest.parents else dest})")
        elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
            broken.append(f"{target} (no heading with anchor #{anchor} in {dest.relative_to(ROOT)})")
    assert not broken, f"{page.relative_to(ROOT)}: links that lead nowhere: {broken}"


def _top_dirs() -> set[str]:
    """The repository's own top-level folders (tracked files), not ignored outputs such as bench-out/."""
    import subprocess

    try:
        files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    except (OSError, subprocess.CalledProcessError):  # not a git checkout (an sdist): folders with a tracked-looking layout
        return {p.name for p in ROOT.iterdir() if p.is_dir() and not p.name.startswith(".") and p.name not in ("bench-out", "build")} | {".ci"}
    return {f.split("/")[0] for f in files if "/" in f}


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_named_repository_paths_exist(page):
    """A code span that starts with one of the repository's folders (`tests/...`, `accel_core/...`)
    or names a root file (`constraints-cpu.txt`) must exist: files get renamed, prose lags."""
    tops, missing = _top_dirs(), []
    for span in set(_SPAN.findall(_prose(page.read_text(encoding="utf-8")))):
        if not re.fullmatch(r"[\w.-]+(/[\w.*-]+)*/?", span) or "*" in span:
            continue
        first = span.split("/")[0]
        root_file = "/" not in span and re.search(r"\.(md|txt|toml|ini|cfg)$", span)
        if (first in tops and "/" in span) or root_file:
            if not (ROOT / span).exists():
                missing.append(span)
    assert not missing, f"{page.relative_to(ROOT)} names paths that are not in the repository: {sorted(missing)}"


def _shell_blocks(text: str) -> list[str]:
    """The bodies of the fenced blocks marked sh / bash (or unmarked), each fence paired with its own end."""
    return [body for lang, body in re.findall(r"^```(\w*)\n(.*?)^```", text, re.S | re.M) if lang in ("", "sh", "bash")]


def _ci_commands() -> list[str]:
    lines = (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines()
    return [ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith(("#", "set ", "cd "))]


def test_readme_commands_are_the_ones_ci_runs():
    ci = _ci_commands()
    assert len(ci) == 2, f".ci/run should run a set-up and a test command, found {ci}"
    shown = [ln.strip() for b in _shell_blocks(README.read_text(encoding="utf-8")) for ln in b.splitlines()]
    for cmd in ci:
        assert cmd in shown, (f"README.md does not show the command .ci/run runs: {cmd!r}. "
                              "Keep the README's set-up and test commands byte-identical with .ci/run.")
    text = README.read_text(encoding="utf-8")
    dev = text.index("## Development and tests")
    assert text.index("## Install") < dev, "Install (what a ComfyUI / webui user does) comes before the development set-up"
    section = text[dev: text.index("\n## ", dev + 1)]
    for cmd in ci:
        assert cmd in section, f"the CI command {cmd!r} belongs under '## Development and tests', after Install"
    assert "fresh virtual environment" in section, "the development set-up pins a CPU torch: it must say to keep it out of a host's environment"


def test_a_host_user_meets_no_command_that_replaces_their_torch_before_the_development_section():
    """The CPU/CI set-up pins torch==...; run in a ComfyUI environment it would replace the CUDA build."""
    text = README.read_text(encoding="utf-8")
    before = text[: text.index("## Development and tests")]
    blocks = _shell_blocks(before)
    assert blocks, "README.md shows no shell command before the development section"
    pinned = [ln for b in blocks for ln in b.splitlines() if re.search(r"pip install[^\n]*\btorch==", ln)]
    assert not pinned, f"README.md shows a command that installs a pinned torch before '## Development and tests': {pinned}"
    assert "sd-accel bench" in before[: before.index("## Quick start")], "the main job's command belongs in Install"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_words_about_how_the_work_was_organised(page):
    text = page.read_text(encoding="utf-8")
    found = re.findall(r"(?i)\bissue \d+|\b(?:this|second|previous|last) session\b|\bhelper\b", text)
    assert not found, f"{page.relative_to(ROOT)} speaks of how the work was organised, not of the software: {found}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_python_example_imports_resolve(page):
    """Every `from sd_accel... import ...` in a page's Python blocks names something that exists."""
    import ast
    import importlib

    blocks = re.findall(r"^```python\n(.*?)^```", page.read_text(encoding="utf-8"), re.S | re.M)
    if page == README:
        assert blocks, "README.md shows no Python example"
    for block in blocks:
        for node in ast.walk(ast.parse(block)):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("sd_accel"):
                mod = importlib.import_module(node.module)
                missing = [a.name for a in node.names if not hasattr(mod, a.name)]
                assert not missing, f"{page.relative_to(ROOT)} imports {missing} from {node.module}, which has no such names"
