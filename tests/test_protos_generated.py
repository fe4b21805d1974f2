"""The committed generated code matches the .proto: regenerate with ``python -m protos.generate``."""
from __future__ import annotations

from pathlib import Path

from protos import engram_memory_v1_pb2 as pb
from protos.generate import REPO_ROOT, generate


def test_generated_code_is_fresh(tmp_path: Path):
    fresh = generate(tmp_path)
    assert fresh, "protoc generated nothing"
    for path in fresh:
        committed = REPO_ROOT / "protos" / path.name
        assert committed.exists(), f"{committed.name} missing: run `python -m protos.generate`"
        assert committed.read_bytes() == path.read_bytes(), f"{committed.name} is stale: run `python -m protos.generate`"


def test_package_is_versioned():
    assert pb.DESCRIPTOR.package == "engram.memory.v1"
    assert {"ShardService", "DirectoryService"} <= set(pb.DESCRIPTOR.services_by_name)
