"""The README's test command is what CI runs; the links between the documentation pages resolve."""

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


PAGES = ["README.md", "BENCHMARKS.md", "tests/README.md",
         "docs/gad.md", "docs/distillm2.md", "docs/amm.md", "docs/pipeline.md"]


def _anchors(path):
    """The #anchors GitHub gives a page's headings: lower case, punctuation but '-' and '_'
    dropped, spaces to '-', a repeated heading suffixed -1, -2, ..."""
    found, seen, in_code = set(), {}, False
    for line in open(path):
        if line.startswith("```"):
            in_code = not in_code
        m = None if in_code else re.match(r"^#{1,6}\s+(.*?)\s*$", line)
        if m:
            slug = re.sub(r"[^\w\- ]", "", m.group(1).lower()).replace(" ", "-")
            n = seen.get(slug, 0)
            found.add(f"{slug}-{n}" if n else slug)
            seen[slug] = n + 1
    return found


def test_links_between_the_pages_resolve():
    broken = []
    for page in PAGES:
        path = os.path.join(ROOT, page)
        text = re.sub(r"```.*?```", "", open(path).read(), flags=re.S)
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"^[a-z]+:", target):
                continue
            file_part, _, anchor = target.partition("#")
            dest = path
            if file_part:
                dest = os.path.normpath(os.path.join(os.path.dirname(path), file_part))
            if not os.path.exists(dest):
                broken.append(f"{page}: {target} (no such file)")
            elif anchor and anchor not in _anchors(dest):
                broken.append(f"{page}: {target} (no such heading)")
    assert not broken, "\n".join(broken)
