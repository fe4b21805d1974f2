"""Where documents come from: text, JSONL and Parquet files, and the standard library's source files."""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import sysconfig
from pathlib import Path
from typing import Iterator

STDLIB = "stdlib"
# Third-party packages installed under the stdlib folder are not part of the standard library.
_NOT_STDLIB_DIRS = {"site-packages", "dist-packages"}
_KIND_OF_SUFFIX = {".jsonl": "jsonl", ".parquet": "parquet"}  # any other file is plain text


@dataclasses.dataclass(frozen=True)
class SourceFile:
    """One file of documents: plain text (the whole file is one document), JSONL or Parquet."""

    path: Path
    kind: str  # "text", "jsonl" or "parquet"
    # The stdlib holds a few files in legacy encodings: they are read leniently, users' files strictly.
    lenient_decoding: bool = False


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def is_validation_file(relative_path: str, validation_fraction: float) -> bool:
    """Whether a file belongs to validation: a hash of its path, so the split never moves between runs."""
    digest = hashlib.sha256(relative_path.encode()).digest()
    return int.from_bytes(digest[:8], "little") < validation_fraction * 2**64


def stdlib_files(split: str, validation_fraction: float) -> list[SourceFile]:
    """The standard library's ``*.py`` files of one split, sorted by relative path."""
    root = stdlib_root()
    want_validation = split == "validation"
    return [
        SourceFile(root / relative, "text", lenient_decoding=True)
        for relative in _python_files_below(root)
        if is_validation_file(relative, validation_fraction) == want_validation
    ]


@functools.cache
def _python_files_below(root: Path) -> tuple[str, ...]:
    """The ``*.py`` files below ``root`` as sorted relative paths, never walking into installed packages."""
    found = []
    for folder, subfolders, files in os.walk(root):
        subfolders[:] = [name for name in subfolders if name not in _NOT_STDLIB_DIRS]
        relative = Path(folder).relative_to(root)
        found += [(relative / name).as_posix() for name in files if name.endswith(".py")]
    return tuple(sorted(found))


def resolve_sources(sources: tuple[str, ...], split: str, validation_fraction: float,
                    max_files: int | None = None) -> list[SourceFile]:
    """The files behind a split's sources; with `max_files`, that many spread evenly over the list."""
    files: list[SourceFile] = []
    for source in sources:
        if source == STDLIB:
            files.extend(stdlib_files(split, validation_fraction))
            continue
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"sources: {source!r} is neither a file nor {STDLIB!r}")
        files.append(SourceFile(path, _KIND_OF_SUFFIX.get(path.suffix.lower(), "text")))
    if max_files is not None and len(files) > max_files:
        files = [files[i * len(files) // max_files] for i in range(max_files)]
    return files


def read_documents(source: SourceFile) -> Iterator[str]:
    """The documents of one file, in order."""
    if source.kind == "jsonl":
        yield from _jsonl_documents(source.path)
    elif source.kind == "parquet":
        yield from _parquet_documents(source.path)
    else:
        yield _read_text(source)


def _read_text(source: SourceFile) -> str:
    data = source.path.read_bytes()
    try:
        return data.decode("utf-8", errors="replace" if source.lenient_decoding else "strict")
    except UnicodeDecodeError as exc:
        raise ValueError(f"{source.path}: not UTF-8 text ({exc})") from exc


def _jsonl_documents(path: Path) -> Iterator[str]:
    with open(path, encoding="utf-8") as lines:
        for line_number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{line_number}: not valid JSON ({exc.msg})") from None
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise ValueError(f"{path}:{line_number}: expected an object with a string 'text' field")
            yield record["text"]


def _parquet_documents(path: Path) -> Iterator[str]:
    import pyarrow.parquet as pq

    parquet = pq.ParquetFile(path)
    if "text" not in parquet.schema_arrow.names:
        raise ValueError(f"{path}: no 'text' column (columns: {parquet.schema_arrow.names})")
    row = 0
    for group in range(parquet.num_row_groups):
        for text in parquet.read_row_group(group, columns=["text"]).column("text").to_pylist():
            if not isinstance(text, str):
                raise ValueError(f"{path}: row {row} of column 'text' is {type(text).__name__}, not a string")
            row += 1
            yield text
