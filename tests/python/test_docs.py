"""Every Python block of the getting-started guide runs as written (each is a whole program), and
the C++ guide shows examples/first_host.cpp (which ctest builds and runs) as it is."""
import os
import re
import subprocess
import sys

import pytest

import pushbook  # noqa: F401 (from build/python, as conftest arranges)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
GUIDE = os.path.join(ROOT, "docs", "getting-started-python.md")


def python_blocks():
    with open(GUIDE) as f:
        text = f.read()
    return re.findall(r"```python\n(.*?)```", text, re.S)


def test_the_guide_has_python_blocks():
    assert len(python_blocks()) >= 5


@pytest.mark.parametrize("index", range(len(python_blocks())))
def test_guide_block_runs(index, tmp_path):
    block = python_blocks()[index]
    env = dict(os.environ)
    if "pushbook" in sys.modules:  # found by conftest (build/python) when run by hand
        package = os.path.dirname(os.path.dirname(sys.modules["pushbook"].__file__))
        env["PYTHONPATH"] = os.pathsep.join(p for p in (package, env.get("PYTHONPATH")) if p)
    done = subprocess.run([sys.executable, "-c", block], cwd=tmp_path, capture_output=True, text=True,
                          timeout=60, env=env)
    assert done.returncode == 0, f"block {index} of {GUIDE} failed:\n{block}\n--- stderr:\n{done.stderr}"


def test_the_cpp_guide_shows_first_host_as_it_is():
    with open(os.path.join(ROOT, "docs", "getting-started-cpp.md")) as f:
        guide = f.read()
    with open(os.path.join(ROOT, "examples", "first_host.cpp")) as f:
        program = f.read()
    assert "```cpp\n" + program + "```" in guide, "docs/getting-started-cpp.md: 'A first host' differs from examples/first_host.cpp"
