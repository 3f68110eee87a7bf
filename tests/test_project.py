"""The README's test command is what CI runs."""

import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_ci_runs_the_readme_test_command():
    readme = open(os.path.join(ROOT, "README.md")).read()
    ci = open(os.path.join(ROOT, ".ci", "run")).read()
    block = re.search(r"# run the tests\n(.+?)\n", readme)
    assert block, "README quick start must have a '# run the tests' line followed by the command"
    command = block.group(1).strip()
    assert "pytest" in command
    assert command in ci.splitlines(), f"CI does not run the README's test command: {command}"
