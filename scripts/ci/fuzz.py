"""Longer fuzzing runs of the properties in tests/test_fuzz.py (the suite runs 50 examples each).

Examples are drawn at random (the suite's are derandomised so CI is repeatable); a failure is
shrunk to a minimal example, printed, and kept in .hypothesis/ so the next run replays it first.

    python scripts/ci/fuzz.py --examples 5000
    python scripts/ci/fuzz.py --examples 20000 -k upload --seed 7
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run as a script, it imports the project beside it

from shared.paths import REPO_ROOT  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--examples", type=int, default=2000, help="examples per property (default 2000)")
    parser.add_argument("-k", dest="keyword", default="", help="only the properties whose name matches")
    parser.add_argument("--seed", type=int, default=None, help="hypothesis seed, to replay a run")
    args = parser.parse_args()
    if args.examples < 1:
        parser.error("--examples must be >= 1")
    command = [sys.executable, "-m", "pytest", "tests/test_fuzz.py", "-q", "--timeout=0",
               "--hypothesis-show-statistics"]
    if args.keyword:
        command += ["-k", args.keyword]
    if args.seed is not None:
        command.append(f"--hypothesis-seed={args.seed}")
    env = {**os.environ, "GESCO_FUZZ_EXAMPLES": str(args.examples), "GESCO_FUZZ_RANDOM": "1"}
    return subprocess.run(command, cwd=REPO_ROOT, env=env).returncode


if __name__ == "__main__":
    sys.exit(main())
