"""The documentation's command snippets that run on a CPU do run: every fenced block marked
``<!-- run: cpu -->`` in the README and docs/ (bash: line by line with this venv's commands first on PATH;
python: as a script), from the repository root."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
MARK = re.compile(r"<!-- run: cpu -->\n```(bash|python)\n(.*?)```", re.S)


def snippets():
    for page in PAGES:
        for i, m in enumerate(MARK.finditer(page.read_text())):
            yield pytest.param(m.group(1), m.group(2), id=f"{page.name}-{i}")


def test_the_pages_mark_runnable_snippets():
    assert len(list(snippets())) >= 3


def test_every_page_link_resolves():
    for page in PAGES:
        for target in re.findall(r"\]\(([^)#]+)\)", page.read_text()):
            if "://" not in target:
                assert (page.parent / target).exists(), f"{page.name}: broken link {target}"


@pytest.mark.parametrize("lang, code", list(snippets()))
def test_snippet_runs(lang, code, tmp_path):
    (ROOT / "out").mkdir(exist_ok=True)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    cmd = ["bash", "-euo", "pipefail", "-c", code] if lang == "bash" else [sys.executable, "-c", code]
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, f"{lang} snippet failed:\n{code}\n--- stderr ---\n{r.stderr[-2000:]}"
