"""Fixtures of the kernel tests; importing ``kernel_checks`` here decides ``TRITON_INTERPRET`` at collection."""
from __future__ import annotations

import inspect
import os

import pytest
import torch
from kernel_checks import IMPLEMENTATIONS, Implementation


@pytest.fixture(autouse=True, scope="session")
def interpreter_patches_the_language_once_a_launch():
    """Triton's interpreter patches ``triton.language`` again at every call of a nested ``@triton.jit``
    function, over half of an interpreted kernel's time here. Within a launch a module once patched
    stays patched (the launch undoes it at its end), so a nested call patches only the language
    modules its function sees that are not patched yet. What the kernels compute is unchanged."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        yield
        return
    import triton.language as tl
    from triton.runtime import interpreter

    patch_lang = getattr(interpreter, "_patch_lang", None)
    if patch_lang is None:  # another Triton: leave it as it is
        yield
        return
    patched: set[int] = set()  # ids of the language modules patched during the running launch
    languages_of: dict = {}  # function -> ids of the language modules its globals name

    def patch_what_is_not_patched(fn):
        languages = languages_of.get(fn)
        if languages is None:
            languages = languages_of[fn] = {id(v) for v in fn.__globals__.values()
                                            if inspect.ismodule(v) and v in (tl, tl.core)}
        if patched and languages <= patched:
            return None  # a nested call: its caller ignores the scope
        launch_starts = not patched
        scope = patch_lang(fn)
        patched.update(languages)
        if launch_starts:
            restore = scope.restore

            def restore_at_the_launchs_end():
                patched.clear()
                restore()

            scope.restore = restore_at_the_launchs_end
        return scope

    interpreter._patch_lang = patch_what_is_not_patched
    yield
    interpreter._patch_lang = patch_lang


@pytest.fixture(autouse=True)
def seeded():
    torch.manual_seed(0)


@pytest.fixture
def impl(request, monkeypatch) -> Implementation:
    """The implementation named by the case (see ``kernel_checks.cases``), its path chosen for the dispatchers."""
    implementation = IMPLEMENTATIONS[request.param]
    monkeypatch.setenv("ENGRAM_KERNELS", implementation.backend)
    return implementation
