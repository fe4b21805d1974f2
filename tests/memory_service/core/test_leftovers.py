"""What killed processes leave behind is swept by name once they are gone, and nothing else is."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from memory_service.core.leftovers import pid_tagged, remove_leftovers


def ended_process_id() -> int:
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                              check=True)
    return int(finished.stdout)


def test_entries_of_ended_processes_are_removed_and_the_rest_stay(tmp_path: Path):
    dead = ended_process_id()
    (tmp_path / f"table-{dead}-layer1-abc").mkdir()
    (tmp_path / f"table-{dead}-layer1-abc" / "rows").write_bytes(b"x" * 64)
    (tmp_path / f"table-{dead}-file").write_bytes(b"x")
    ours = tmp_path / f"{pid_tagged('table-')}layer3-def"
    ours.mkdir()
    others = [tmp_path / f"shard-{dead}-socket", tmp_path / "table-12x-odd", tmp_path / f"table-{dead}"]
    for path in others:
        path.mkdir()

    removed = remove_leftovers(tmp_path, "table-")

    assert sorted(removed) == sorted([f"table-{dead}-layer1-abc", f"table-{dead}-file"])
    assert ours.is_dir() and all(path.is_dir() for path in others)
    assert sorted(os.listdir(tmp_path)) == sorted([ours.name, *(path.name for path in others)])
    assert remove_leftovers(tmp_path / "absent", "table-") == []
