"""docs/porting.md: every code block is checked.

Python and TOML blocks must be copied verbatim from the file named by the
``<!-- from FILE -->`` comment above them. Shell blocks are run, in order,
in a fresh virtual environment holding pvcore (``pip install DIR`` installs
a wheel of DIR, ``pvcore ...`` and ``pytest ...`` run there and must
succeed).
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from pvcore.testing.conformance.install import FreshEnvironment, build_wheel

REPO = Path(__file__).resolve().parents[1]
GUIDE = REPO / "docs" / "porting.md"
BLOCK = re.compile(r"(?:<!-- from (?P<source>\S+) -->\n)?```(?P<language>\w*)\n(?P<text>.*?)```\n", re.S)
EXAMPLE_CODE = ("__init__.py", "plugin.py", "transport.py")


def blocks(language: str) -> list[tuple[str | None, str]]:
    """(source file, text) of every block of ``language`` in the guide."""
    return [(m["source"], m["text"]) for m in BLOCK.finditer(GUIDE.read_text()) if m["language"] == language]


def test_every_block_is_of_a_checked_kind() -> None:
    languages = {m["language"] for m in BLOCK.finditer(GUIDE.read_text())}
    assert languages == {"python", "toml", "sh"}
    assert GUIDE.read_text().count("```") == 2 * len(list(BLOCK.finditer(GUIDE.read_text())))


@pytest.mark.parametrize("language", ["python", "toml"])
def test_code_blocks_are_the_example_files(language: str) -> None:
    found = blocks(language)
    assert found
    for source, text in found:
        assert source is not None, f"a {language} block without <!-- from FILE -->:\n{text}"
        assert text in (REPO / source).read_text(), f"this block is no longer in {source}:\n{text}"


def test_shell_blocks_run(tmp_path: Path) -> None:
    fresh = FreshEnvironment(tmp_path / "venv")
    fresh.install(build_wheel(REPO, tmp_path / "wheels"))
    work = tmp_path / "work"
    work.mkdir()
    commands = [shlex.split(line) for _, text in blocks("sh") for line in text.splitlines() if line.strip()]
    assert [command[0] for command in commands] == ["pvcore", "pip", "pvcore", "pytest"]
    for command in commands:
        if command[:2] == ["pvcore", "new-plugin"]:
            done = fresh.run(command, cwd=work)
            assert done.returncode == 0, done.stderr
            assert (work / f"pvcore-{command[2]}" / "pyproject.toml").exists()
        elif command[:2] == ["pip", "install"]:
            fresh.install(build_wheel(REPO / command[2], tmp_path / "wheels"))
        else:
            runner = [str(fresh.python), "-m", "pytest", "-p", "no:cacheprovider"] if command[0] == "pytest" else ["pvcore"]
            done = fresh.run([*runner, *command[1:]], cwd=work)
            assert done.returncode == 0, f"{shlex.join(command)}:\n{done.stdout}{done.stderr}"
            if command[0] == "pytest":
                assert "16 passed" in done.stdout, done.stdout
            else:
                assert "loophv 0.1.0 (pvcore-loophv): ok" in done.stdout


def test_the_worked_example_is_small() -> None:
    lines = sum(len((REPO / "examples/pvcore-loophv/pvcore_loophv" / name).read_text().splitlines()) for name in EXAMPLE_CODE)
    assert lines < 250
    assert f"| {lines} |" in GUIDE.read_text(), "the guide's size table gives another count for loophv"
