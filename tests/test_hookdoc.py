"""docs/hooks.md is generated from pvcore/hookspecs.py and must be kept fresh."""

from pathlib import Path

from pvcore import hookdoc, hookspecs

DOC = Path(__file__).resolve().parent.parent / "docs" / "hooks.md"


def test_hooks_md_is_up_to_date() -> None:
    assert DOC.read_text() == hookdoc.render(), "docs/hooks.md is stale: run `make hooks-doc`"


def test_every_hook_is_documented_with_who_answers() -> None:
    hooks = [name for name in vars(hookspecs) if name.startswith("pvcore_")]
    assert len(hooks) >= 7
    for name in hooks:
        doc = getattr(hookspecs, name).__doc__ or ""
        assert "Called" in doc, f"{name}: say when it is called"
        assert "Return" in doc, f"{name}: say what it returns"
        assert ("firstresult" in doc) or ("answer" in doc), f"{name}: say who answers"
