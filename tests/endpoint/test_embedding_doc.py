"""The program in docs/embedding.md runs as written, as an outside program would run it."""

import re
import subprocess
import sys
from pathlib import Path

DOC = Path(__file__).resolve().parents[2] / "docs" / "embedding.md"


def test_embedding_example_runs(tmp_path: Path) -> None:
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.DOTALL)
    assert blocks, "docs/embedding.md has no python example"
    script = tmp_path / "embed.py"
    script.write_text(blocks[0])
    # Run from an unrelated directory, as a program outside the project would.
    done = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert "server said done?" in done.stdout
    assert len(blocks[0].splitlines()) <= 45
