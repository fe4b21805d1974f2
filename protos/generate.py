"""Regenerate the Python code of the wire contract: ``python -m protos.generate`` (or ``make protos``)."""
from __future__ import annotations

import sys
from pathlib import Path

from grpc_tools import protoc

REPO_ROOT = Path(__file__).resolve().parents[1]
PROTO_FILES = ("protos/engram_memory_v1.proto",)


def run_protoc(*args: str) -> None:
    """Run the bundled protoc with the repo root and the well-known types on the include path."""
    # Protos are addressed from the repo root so generated imports read ``from protos import ...``.
    include = Path(protoc.__file__).resolve().parent / "_proto"
    status = protoc.main(["protoc", f"-I{REPO_ROOT}", f"-I{include}", *args])
    if status != 0:
        raise RuntimeError(f"protoc {' '.join(args)} failed with status {status}")


def generate(out_dir: Path = REPO_ROOT) -> list[Path]:
    """Compile every proto into ``out_dir``; return the generated files."""
    for proto in PROTO_FILES:
        run_protoc(f"--python_out={out_dir}", f"--pyi_out={out_dir}", f"--grpc_python_out={out_dir}",
                   str(REPO_ROOT / proto))
    return sorted((Path(out_dir) / "protos").glob("*_pb2*.py*"))


if __name__ == "__main__":
    for path in generate():
        print(path.relative_to(REPO_ROOT) if path.is_relative_to(REPO_ROOT) else path)
    sys.exit(0)
