"""The README's runnable Python snippets (those with a `__main__` guard: the library and the standalone
transfer) run as written, each as a script in a fresh process and a fresh directory."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"^```python\n(.*?)^```", README.read_text(), flags=re.S | re.M)
SCRIPTS = [block for block in BLOCKS if 'if __name__ == "__main__":' in block]


def test_the_readme_has_runnable_snippets():
    assert len(SCRIPTS) >= 2, f"{README}: {len(SCRIPTS)} runnable python snippet(s)"


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda s: s.split("import", 2)[1].split()[0])
def test_a_readme_snippet_runs_as_written(script, tmp_path):
    path = tmp_path / "snippet.py"
    path.write_text(script)
    done = subprocess.run(
        [sys.executable, str(path)], cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, f"{path} exited {done.returncode}:\n{done.stderr[-3000:]}"
