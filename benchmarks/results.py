"""Print benchmark lines and, on request, append them to benchmarks/RESULTS.md with date and commit."""

import datetime
import os
import subprocess
from pathlib import Path

RESULTS = Path(__file__).parent / "RESULTS.md"


class Recorder:
    def __init__(self):
        self.lines: list[str] = []

    def __call__(self, line: str) -> None:
        print(line, flush=True)
        self.lines.append(line)

    def append(self, title: str, lines: list[str] | None = None) -> None:
        """Add a '### title — date — commit' section holding the lines (default: all echoed so far)."""
        # KIMI_MLX_COMMIT first: the GPU machine's copy of the tree may carry a .git older than its files
        git = ["git", "rev-parse", "--short", "HEAD"]
        commit = os.environ.get("KIMI_MLX_COMMIT", "") or subprocess.run(
            git, capture_output=True, text=True, cwd=Path(__file__).parent).stdout.strip()
        body = "\n".join(self.lines if lines is None else lines)
        with open(RESULTS, "a") as f:
            f.write(f"\n### {title} — {datetime.date.today()} — commit {commit or '?'}\n\n```\n{body}\n```\n")
