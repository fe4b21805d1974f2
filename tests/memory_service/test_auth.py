"""The two rights' tokens: checks at start, constant-time matching, rotation with a grace period."""
from __future__ import annotations

import pytest

from memory_service import auth
from memory_service.auth import AccessTokens
from memory_service.controller import ControllerOptions

DATA, ADMIN = "data-token-0123456789", "admin-token-0123456789"


def test_a_presented_token_maps_to_its_right():
    tokens = AccessTokens(DATA, ADMIN)
    assert tokens.right_of(f"Bearer {ADMIN}") == "admin"
    assert tokens.right_of(f"Bearer {DATA}") == "data"
    for wrong in (DATA, f"Bearer {DATA[:-1]}", f"bearer {DATA}", "", f"Bearer {DATA} "):
        assert tokens.right_of(wrong) is None


@pytest.mark.parametrize("data, admin, named", [
    ("short", ADMIN, "data token"), (DATA, "x" * 15, "admin token"), (DATA, DATA, "admin token"),
    ("tab\there-0123456789", ADMIN, "data token"), ("ünïcode-0123456789", ADMIN, "data token"),
])
def test_unusable_tokens_are_refused_before_anything_starts(data, admin, named):
    with pytest.raises(ValueError, match=named):
        AccessTokens(data, admin)
    with pytest.raises(ValueError, match=named):
        ControllerOptions(data_token=data, admin_token=admin)


def test_rotation_keeps_the_old_tokens_for_the_grace_period_only(monkeypatch):
    now = [1000.0]
    monkeypatch.setattr(auth.time, "monotonic", lambda: now[0])
    tokens = AccessTokens(DATA, ADMIN)
    tokens.rotate("new-data-token-0123456", "new-admin-token-012345", grace_s=30)
    assert (tokens.data, tokens.admin) == ("new-data-token-0123456", "new-admin-token-012345")
    assert tokens.right_of(f"Bearer {DATA}") == "data" and tokens.right_of(f"Bearer {ADMIN}") == "admin"
    now[0] += 30.5
    assert tokens.right_of(f"Bearer {DATA}") is None and tokens.right_of(f"Bearer {ADMIN}") is None
    assert tokens.right_of("Bearer new-admin-token-012345") == "admin"
    with pytest.raises(ValueError, match="admin token"):
        tokens.rotate(DATA, DATA)
    assert tokens.data == "new-data-token-0123456"  # a refused rotation changes nothing


def test_generated_tokens_differ_and_are_long():
    first, second = AccessTokens.generate(), AccessTokens.generate()
    assert len({first.data, first.admin, second.data, second.admin}) == 4
    assert min(len(t) for t in (first.data, first.admin)) >= 40
