"""Documentation stays true: hooks documented, config reference fresh, public API documented."""

from __future__ import annotations

import inspect
import subprocess
import sys

import pytest
from conftest import ROOT

import kamal
from kamal import hookspecs

HOOKS = [name for name, obj in vars(hookspecs).items()
         if name.startswith("register_") and callable(obj)]


@pytest.mark.parametrize("hook", HOOKS)
def test_every_hook_is_documented(hook):
    assert inspect.getdoc(getattr(hookspecs, hook))
    assert f"`{hook}(register)`" in (ROOT / "docs" / "plugins.md").read_text()


def test_configuration_reference_is_up_to_date():
    result = subprocess.run([sys.executable, str(ROOT / "docs" / "generate.py"), "--check"],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("name", [n for n in kamal.__all__ if n != "__version__"])
def test_public_api_is_importable_and_documented(name):
    obj = getattr(kamal, name)
    assert inspect.getdoc(obj), f"kamal.{name} has no docstring"


def test_docs_pages_exist_and_are_linked_from_the_readme():
    readme = (ROOT / "README.md").read_text()
    for page in ("concepts", "configuration", "cli", "architecture", "plugins"):
        assert (ROOT / "docs" / f"{page}.md").exists()
        assert f"docs/{page}.md" in readme
