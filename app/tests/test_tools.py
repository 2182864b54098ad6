"""The built-in tool registry."""

from __future__ import annotations

import pytest

from xagent.tools import REGISTRY, ToolError, call_tool


def test_registry_rows_are_complete() -> None:
    assert set(REGISTRY) == {"calculator", "echo", "sleep", "word_count"}
    for tool in REGISTRY.values():
        row = tool.row()
        assert set(row) == {"name", "description", "schema", "version"}
        assert row["schema"]["type"] == "object"
        assert row["description"]


async def test_calls_and_validation() -> None:
    assert await call_tool("echo", {"text": "hi"}) == {"text": "hi"}
    assert await call_tool("calculator", {"op": "div", "a": 1, "b": 4}) == {"value": 0.25}
    assert await call_tool("word_count", {"text": "a bc"}) == {"words": 2, "chars": 4}
    with pytest.raises(ToolError, match="unknown tool"):
        await call_tool("rm", {})
    with pytest.raises(ToolError, match="missing argument 'text'"):
        await call_tool("echo", {})
    with pytest.raises(ToolError, match="unknown argument"):
        await call_tool("echo", {"text": "x", "more": 1})
    with pytest.raises(ToolError, match="must be of type number"):
        await call_tool("calculator", {"op": "add", "a": "1", "b": 2})
    with pytest.raises(ToolError, match="division by zero"):
        await call_tool("calculator", {"op": "div", "a": 1, "b": 0})


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ({"op": "pow", "a": -8, "b": 0.5}, r"pow\(-8, 0.5\): math domain error"),
        ({"op": "mul", "a": 1e308, "b": 10}, r"mul\(1e\+308, 10\) is not a finite number"),
        ({"op": "pow", "a": 1e308, "b": 2}, r"pow\(1e\+308, 2\): math range error"),
        ({"op": "add", "a": 1e308, "b": 1e308}, "is not a finite number"),
    ],
)
async def test_calculator_failures_are_tool_errors(args: dict[str, object], message: str) -> None:
    """The issue's runs that stayed `running`: the tool now rejects them itself."""
    with pytest.raises(ToolError, match=message):
        await call_tool("calculator", args)
