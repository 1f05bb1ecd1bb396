"""One error tree: the drawing in ``corral/errors.py`` is the tree of classes, and every class
has its HTTP status in ``corral/statuses.py``.

The drawing is read as a newcomer reads it: a name's depth is its column, its parent the
nearest name one level up, and "(also a X)" names a second parent.
"""

from __future__ import annotations

import importlib
import pkgutil
import re

import pytest

import corral
from corral import errors
from corral.errors import (
    BridgeError,
    CorralError,
    EnvironmentNotFound,
    Refused,
    SandboxError,
    SnapshotError,
    TokenRefused,
)
from corral.statuses import STATUS, status_for

# Defined by the store until issue 9's store branch moves them here; once it has, this set
# must be emptied (the test below fails as soon as one of them lives in corral/errors.py).
_LINE = re.compile(r"^(?P<lead>[│├└─ ]*)(?P<name>[A-Z]\w*)(?P<rest>.*)$")
_ALSO = re.compile(r"\(also an? (\w+)\)")


def drawn_tree(doc: str) -> dict[str, tuple[str | None, set[str]]]:
    """The drawing in ``doc``: each name -> (its parent, the other parents it names)."""
    block = doc.split("::\n", 1)[1].strip("\n").split("\n\n", 1)[0]
    tree: dict[str, tuple[str | None, set[str]]] = {}
    stack: list[str] = []
    for line in block.splitlines():
        match = _LINE.match(line[4:])
        assert match, f"not a line of the tree: {line!r}"
        depth, name = len(match["lead"]) // 4, match["name"]
        assert name not in tree, f"{name} is drawn twice"
        assert depth <= len(stack), f"{name} is drawn below nothing"
        del stack[depth:]
        tree[name] = (stack[-1] if stack else None, set(_ALSO.findall(match["rest"])))
        stack.append(name)
    return tree


def error_classes() -> list[type[CorralError]]:
    """Every CorralError subclass defined anywhere in the corral package."""
    skip = ("runner", "boot", "migrations", "__main__", "corral.cli")
    for module in pkgutil.walk_packages(corral.__path__, "corral."):
        if not any(part in module.name for part in skip):
            importlib.import_module(module.name)

    def below(cls: type[CorralError]) -> list[type[CorralError]]:
        return [c for sub in cls.__subclasses__() for c in (sub, *below(sub))]

    found = {c for c in below(CorralError) if c.__module__.startswith("corral.")}
    return sorted({CorralError, *found}, key=lambda c: c.__name__)


def test_the_drawing_is_the_tree_of_classes() -> None:
    assert errors.__doc__ is not None
    tree = drawn_tree(errors.__doc__)
    classes = {cls.__name__: cls for cls in error_classes()}
    assert len(classes) == len(error_classes()), "two error classes share a name"
    assert sorted(set(classes) - set(tree)) == [], "draw these in corral/errors.py's docstring"
    assert sorted(set(tree) - set(classes)) == [], "drawn in corral/errors.py, but no such class"
    for name, (parent, also) in tree.items():
        bases = [b.__name__ for b in classes[name].__bases__]
        if name == "CorralError":
            assert parent is None
            continue
        assert parent == bases[0], f"{name} is drawn under {parent}, but derives from {bases[0]}"
        assert also == set(bases[1:]), f"{name}: say '(also a ...)' for each of {bases[1:]}"


def test_every_error_class_lives_in_errors_py() -> None:
    elsewhere = {
        cls.__name__: cls.__module__ for cls in error_classes() if cls.__module__ != "corral.errors"
    }
    assert elsewhere == {}, "move these into corral/errors.py"


def test_every_error_class_has_its_own_status() -> None:
    codes = [cls.__dict__.get("code") for cls in error_classes()]
    assert None not in codes, "every error class names its own code"
    assert len(set(codes)) == len(codes), "two error classes share a code"
    assert set(codes) == set(STATUS), "one row per code in corral/statuses.py, and no other"
    assert all(100 <= s < 600 for s in STATUS.values())


def test_status_table_choices() -> None:
    expected = {
        "environment_not_found": 404,
        "snapshot_not_found": 404,
        "environment_exists": 409,
        "environment_busy": 409,
        "conflict": 409,
        "nothing_to_freeze": 409,
        "invalid_input": 400,
        "import_failed": 400,
        "corrupt_blob": 500,
        "disk_full": 507,
        "command_not_found": 422,
        "requirement_missing": 503,
        "store_error": 500,
        "runc_error": 500,
        "budget_exhausted": 402,
        "concurrency_limit": 429,
        "input_too_large": 413,
        "agent_call_refused": 409,
        "token_refused": 401,
    }
    assert {code: STATUS[code] for code in expected} == expected


def test_an_unlisted_subclass_answers_with_its_family_status() -> None:
    class Later(SnapshotError):
        code = "later"

    class Sooner(SandboxError):
        code = "sooner"

    class Unnamed(EnvironmentNotFound):
        pass

    assert status_for(Later()) == 500
    assert status_for(Sooner()) == 500
    assert status_for(EnvironmentNotFound("x")) == 404
    assert status_for(Unnamed("x")) == 404


@pytest.mark.parametrize("status", [400, 403, 404, 413, 431, 502, 504])
def test_a_refusal_is_a_bridge_error_that_carries_its_status(status: int) -> None:
    refused = Refused(status, "some_condition", "what went wrong", closes=True)
    assert isinstance(refused, BridgeError) and isinstance(refused, CorralError)
    assert status_for(refused) == status
    assert refused.to_dict() == {"error": "some_condition", "detail": "what went wrong"}
    assert str(refused) == "what went wrong" and refused.closes
    assert Refused.code == "refused"  # the class keeps its own code; each refusal names its own


def test_a_token_refusal_keeps_its_reason() -> None:
    refused = TokenRefused("expired", "the run token has expired")
    assert isinstance(refused, BridgeError)
    assert (refused.reason, refused.status, refused.code) == ("expired", 401, "token_refused")
    assert status_for(refused) == 401
