"""The tables of README.md and docs/*.md (the README's "What works" figures included) are the ones
benchmarks/readme_tables.py writes from benchmarks/results/*.json: a figure changed by hand, or a
results file changed without regenerating the pages, fails here. So do links between the pages
that point nowhere, and file paths the pages name that no longer exist."""

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def test_readme_tables_match_the_results_files():
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "readme_tables.py"), "--check"],
                         check=False, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr


def _anchor(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation but '-' and '_' dropped, spaces -> '-'."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _outside_code(text: str) -> str:
    return re.sub(r"```.*?```", "", text, flags=re.DOTALL)


def test_links_between_the_pages_resolve():
    anchors = {p: {_anchor(h) for h in re.findall(r"^#+ (.+)$", _outside_code(p.read_text()), re.MULTILINE)} for p in PAGES}
    broken = []
    for page in PAGES:
        for target in re.findall(r"\]\(([^)\s]+)\)", _outside_code(page.read_text())):
            if re.match(r"[a-z]+://", target):
                continue
            path, _, anchor = target.partition("#")
            dest = (page.parent / path).resolve() if path else page
            if not dest.exists():
                broken.append(f"{page.name}: {target} (no such file)")
            elif anchor and dest in anchors and anchor not in anchors[dest]:
                broken.append(f"{page.name}: {target} (no such heading)")
    assert not broken, "\n".join(broken)


# a path in backticks: a name with a '/' ending in a file type, or a folder of two names or more
# ending in '/' (a single name, as the store's `segments/`, is a layout, not a path of the repository)
PATH = re.compile(r"`((?:\.?[\w.-]+/)+(?:[\w.-]+\.(?:py|md|yaml|json|sh|txt|tpl|jsonl))?)`")
BASES = ["", "expertmesh/", "benchmarks/", "benchmarks/results/", "tests/"]
NOT_YET = {"benchmarks/results/gpu.json"}  # written by a benchmark that has not run yet (bench_gpu.py)


def test_the_paths_the_pages_name_exist():
    missing = []
    for page in PAGES:
        for path in PATH.findall(page.read_text()):
            if "<" in path or path.startswith(("~", "/")) or ":" in path or path in NOT_YET:
                continue
            if path.endswith("/") and path.count("/") < 2:
                continue
            if not any((ROOT / base / path).exists() for base in BASES):
                missing.append(f"{page.name}: {path}")
    assert not missing, "\n".join(missing)
