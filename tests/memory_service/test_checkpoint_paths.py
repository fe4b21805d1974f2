"""Checkpoint paths resolve inside the data root or are refused, links included, existence never told."""
from __future__ import annotations

import pytest

from memory_service.checkpoint import PathRefused, inside_root


def test_relative_and_absolute_paths_inside_the_root_resolve(tmp_path):
    root = tmp_path / "root"
    assert inside_root(root, "ckpt/step-1", "directory") == root / "ckpt" / "step-1"
    assert inside_root(root, str(root / "ckpt"), "directory") == root / "ckpt"
    assert inside_root(root, "a/../b", "directory") == root / "b"


@pytest.mark.parametrize("path", ["", ".", "..", "../x", "/", "/etc", "a/../../x", "nul\x00byte"])
def test_paths_outside_the_root_are_refused(tmp_path, path):
    with pytest.raises(PathRefused) as caught:
        inside_root(tmp_path / "root", path, "directory")
    assert caught.value.field == "directory" and "data root" in str(caught.value)


def test_a_link_out_of_the_root_is_refused_and_existence_is_not_told(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    (tmp_path / "secret").mkdir()
    (root / "link").symlink_to(tmp_path / "secret")
    with pytest.raises(PathRefused):
        inside_root(root, "link/x", "directory")
    messages = set()
    for path in ("../secret", "../no-such-folder"):
        with pytest.raises(PathRefused) as caught:
            inside_root(root, path, "directory")
        messages.add(str(caught.value).replace(path, "PATH"))
    assert len(messages) == 1
