"""Every Python block of the getting-started guide runs as written (each is a whole program), and
the C++ guide shows only whole programs: examples/*.cpp (which ctest builds and runs) as they are."""
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


@pytest.mark.parametrize("example", ["first_host.cpp", "durable_host.cpp"])
def test_the_cpp_guide_shows_its_examples_as_they_are(example):
    with open(os.path.join(ROOT, "docs", "getting-started-cpp.md")) as f:
        guide = f.read()
    with open(os.path.join(ROOT, "examples", example)) as f:
        program = f.read()
    assert "```cpp\n" + program + "```" in guide, f"docs/getting-started-cpp.md does not show examples/{example} as it is"


def test_every_cpp_block_of_the_guide_is_an_example():
    with open(os.path.join(ROOT, "docs", "getting-started-cpp.md")) as f:
        blocks = re.findall(r"```cpp\n(.*?)```", f.read(), re.S)
    assert len(blocks) == 2, "a C++ block that is not a whole example: make it one (examples/) or drop it"
