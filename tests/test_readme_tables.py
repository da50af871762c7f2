"""The README's benchmark and retrieval tables are the ones benchmarks/readme_tables.py writes
from benchmarks/results/*.json: a figure changed by hand, or a results file changed without
regenerating the README, fails here."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_readme_tables_match_the_results_files():
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "readme_tables.py"), "--check"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
