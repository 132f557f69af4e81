"""Docs as tests: every Python block of README.md runs as written, in order, in one namespace.

A block preceded by the line ``<!-- readme: skip (why) -->`` is reported as skipped with that
reason (placeholder paths), never dropped silently.
"""

import pathlib
import re

import pytest

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"
_SKIP = re.compile(r"<!--\s*readme:\s*skip\s*\((.+?)\)\s*-->")


def python_blocks(text: str) -> list[tuple[int, str, str | None]]:
    """``(line number, code, skip reason or None)`` for each fenced ```python block."""
    blocks, lines, i = [], text.splitlines(), 0
    while i < len(lines):
        if lines[i].strip() == "```python":
            start, body = i + 1, []
            i += 1
            while i < len(lines) and lines[i].strip() != "```":
                body.append(lines[i])
                i += 1
            prev = lines[start - 2] if start >= 2 else ""
            m = _SKIP.search(prev)
            blocks.append((start + 1, "\n".join(body) + "\n", m.group(1) if m else None))
        i += 1
    return blocks


BLOCKS = python_blocks(README.read_text(encoding="utf-8"))
NAMESPACE: dict = {}


def test_blocks_are_found_and_markers_read():
    assert len(BLOCKS) >= 8
    assert BLOCKS[0][1].startswith("import jax")
    skipped = [reason for _, _, reason in BLOCKS if reason]
    assert skipped and all("placeholder" in r for r in skipped)
    sample = "x\n<!-- readme: skip (needs a GPU) -->\n```python\nboom()\n```\n```python\nok = 1\n```\n"
    assert python_blocks(sample) == [(4, "boom()\n", "needs a GPU"), (7, "ok = 1\n", None)]


@pytest.mark.slow
@pytest.mark.parametrize("line,code,skip", BLOCKS, ids=[f"README.md:{b[0]}" for b in BLOCKS])
def test_readme_block_runs(line, code, skip):
    if skip:
        pytest.skip(f"README.md:{line} is marked: {skip}")
    exec(compile(code, f"README.md:{line}", "exec"), NAMESPACE)
    if "completions(out, tok, stop=" in code:  # the stop-string block's claimed result
        c = NAMESPACE["c"]
        assert (c.text, c.finish_reason, c.stop) == (" away from your friends.", "stop", "\n\n")
        assert NAMESPACE["out"].stop_index.tolist() == [0]
