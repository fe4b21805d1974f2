"""Regenerate the Python code of the wire contract: ``make protos``.

The committed code comes from grpcio-tools==1.71.0 (``GRPC_TOOLS_PIN`` in the Makefile, the one place the pin
lives): its code needs only grpcio>=1.71.0 and protobuf>=5.29.0, hence the floors in pyproject.toml. ``make protos``
installs that generator in ``.venv-protos``; ``python -m protos.generate`` uses whichever grpcio-tools is
installed and warns when it is not the pinned one.
"""
from __future__ import annotations

import re
import sys
import warnings
from importlib.metadata import version
from pathlib import Path

from grpc_tools import protoc

REPO_ROOT = Path(__file__).resolve().parents[1]
PROTO_FILES = ("protos/engram_memory_v1.proto",)


def pinned_version() -> str | None:
    """The grpcio-tools version that ``GRPC_TOOLS_PIN`` in the Makefile names (None without a Makefile)."""
    makefile = REPO_ROOT / "Makefile"
    text = makefile.read_text() if makefile.exists() else ""
    found = re.search(r"^GRPC_TOOLS_PIN\s*\?=\s*grpcio-tools==(\S+)", text, re.M)
    return found.group(1) if found else None


def run_protoc(*args: str) -> None:
    """Run the bundled protoc with the repo root and the well-known types on the include path."""
    # Protos are addressed from the repo root so generated imports read ``from protos import ...``.
    include = Path(protoc.__file__).resolve().parent / "_proto"
    status = protoc.main(["protoc", f"-I{REPO_ROOT}", f"-I{include}", *args])
    if status != 0:
        raise RuntimeError(f"protoc {' '.join(args)} failed with status {status}")


def generate(out_dir: Path = REPO_ROOT) -> list[Path]:
    """Compile every proto into ``out_dir``; return the generated files."""
    pinned, installed = pinned_version(), version("grpcio-tools")
    if pinned and installed != pinned:
        warnings.warn(f"grpcio-tools {installed} is not the pinned {pinned}: the code it generates may need newer "
                      "grpcio/protobuf than pyproject.toml allows; run `make protos` instead", stacklevel=2)
    for proto in PROTO_FILES:
        run_protoc(f"--python_out={out_dir}", f"--pyi_out={out_dir}", f"--grpc_python_out={out_dir}",
                   str(REPO_ROOT / proto))
    return sorted((Path(out_dir) / "protos").glob("*_pb2*.py*"))


if __name__ == "__main__":
    for path in generate():
        print(path.relative_to(REPO_ROOT) if path.is_relative_to(REPO_ROOT) else path)
    sys.exit(0)
