"""Built-in tools: a small registry (name, description, JSON schema of arguments, version).

``xagent-bootstrap tools`` upserts this registry into the ``tools`` table; the agent task
looks tools up here by name and checks that the database row is active.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

ToolFunc = Callable[[dict[str, Any]], Awaitable[Any]]


class ToolError(Exception):
    """The tool rejected its arguments or failed."""


@dataclass(frozen=True)
class Tool:
    name: str
    description: str
    schema: dict[str, Any]
    version: str
    func: ToolFunc = field(compare=False, repr=False)

    def row(self) -> dict[str, Any]:
        """The database representation (without ``active``/``updated_at``)."""
        return {
            "name": self.name,
            "description": self.description,
            "schema": self.schema,
            "version": self.version,
        }


REGISTRY: dict[str, Tool] = {}


def tool(
    name: str, description: str, schema: dict[str, Any], version: str = "1"
) -> Callable[[ToolFunc], ToolFunc]:
    """Register ``func`` as a built-in tool."""

    def register(func: ToolFunc) -> ToolFunc:
        if name in REGISTRY:
            raise ValueError(f"tool {name!r} registered twice")
        REGISTRY[name] = Tool(name, description, schema, version, func)
        return func

    return register


def _check_args(schema: dict[str, Any], args: dict[str, Any]) -> None:
    """A minimal JSON-schema check: required keys, no unknown keys, primitive types."""
    if not isinstance(args, dict):
        raise ToolError("arguments must be an object")
    props: dict[str, Any] = schema.get("properties", {})
    for key in schema.get("required", []):
        if key not in args:
            raise ToolError(f"missing argument {key!r}")
    if schema.get("additionalProperties") is False:
        unknown = sorted(set(args) - set(props))
        if unknown:
            raise ToolError(f"unknown argument(s): {', '.join(unknown)}")
    types: dict[str, tuple[type, ...]] = {
        "string": (str,),
        "integer": (int,),
        "number": (int, float),
        "boolean": (bool,),
        "array": (list,),
        "object": (dict,),
    }
    for key, value in args.items():
        expected = props.get(key, {}).get("type")
        if expected in types:
            ok = isinstance(value, types[expected])
            if expected in {"integer", "number"} and isinstance(value, bool):
                ok = False
            if not ok:
                raise ToolError(f"argument {key!r} must be of type {expected}")


async def call_tool(name: str, args: dict[str, Any]) -> Any:
    """Validate ``args`` against the tool's schema and run it."""
    found = REGISTRY.get(name)
    if found is None:
        raise ToolError(f"unknown tool {name!r}")
    _check_args(found.schema, args)
    return await found.func(args)


# Arguments of the tools that take one text.
_TEXT_ARGS: dict[str, Any] = {
    "type": "object",
    "properties": {"text": {"type": "string"}},
    "required": ["text"],
    "additionalProperties": False,
}


@tool(
    "echo",
    "Return the given text unchanged.",
    _TEXT_ARGS,
)
async def _echo(args: dict[str, Any]) -> Any:
    return {"text": args["text"]}


@tool(
    "word_count",
    "Count words and characters of a text.",
    _TEXT_ARGS,
)
async def _word_count(args: dict[str, Any]) -> Any:
    text: str = args["text"]
    return {"words": len(text.split()), "chars": len(text)}


@tool(
    "calculator",
    "Apply an arithmetic operation (add, sub, mul, div, pow) to two numbers.",
    {
        "type": "object",
        "properties": {
            "op": {"type": "string", "enum": ["add", "sub", "mul", "div", "pow"]},
            "a": {"type": "number"},
            "b": {"type": "number"},
        },
        "required": ["op", "a", "b"],
        "additionalProperties": False,
    },
)
async def _calculator(args: dict[str, Any]) -> Any:
    a, b, op = args["a"], args["b"], args["op"]
    try:
        if op == "add":
            value = a + b
        elif op == "sub":
            value = a - b
        elif op == "mul":
            value = a * b
        elif op == "div":
            if b == 0:
                raise ToolError("division by zero")
            value = a / b
        elif op == "pow":
            if abs(b) > 64:
                raise ToolError("exponent too large")
            value = math.pow(a, b)
        else:
            raise ToolError(f"unknown op {op!r}")
    except (ArithmeticError, ValueError) as exc:  # e.g. pow(-8, 0.5): math domain error
        raise ToolError(f"{op}({a!r}, {b!r}): {exc}") from None
    if isinstance(value, float) and not math.isfinite(value):  # e.g. 1e308 * 10
        raise ToolError(f"{op}({a!r}, {b!r}) is not a finite number")
    return {"value": value}


@tool(
    "sleep",
    "Wait for the given number of seconds (at most 600), then return.",
    {
        "type": "object",
        "properties": {"seconds": {"type": "number"}},
        "required": ["seconds"],
        "additionalProperties": False,
    },
)
async def _sleep(args: dict[str, Any]) -> Any:
    seconds = float(args["seconds"])
    if not 0 <= seconds <= 600:
        raise ToolError("seconds must be between 0 and 600")
    await asyncio.sleep(seconds)
    return {"slept": seconds}
