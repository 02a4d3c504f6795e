"""Built-in tools a chatml-family model can call (`spongebob chat --tools calc`, the demo's
tool-use item): each an OpenAI function schema and the Python that answers it.

A tool never raises on what the model wrote: a bad call comes back as an `error: …` result,
which goes to the model as the tool message, as a real tool runtime would do.
"""

from __future__ import annotations

import ast
import json
import operator
from collections.abc import Callable

from spongebob.errors import UserError

CALC_SCHEMA = {
    "type": "function",
    "function": {
        "name": "calc",
        "description": "Evaluate an arithmetic expression and return the result.",
        "parameters": {
            "type": "object",
            "properties": {"expr": {"type": "string", "description": "e.g. 12*(3+4) or 100-37"}},
            "required": ["expr"],
        },
    },
}

_BINARY = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: operator.pow,
}
_UNARY = {ast.UAdd: operator.pos, ast.USub: operator.neg}
MAX_EXPR = 200  # characters
MAX_POWER = 64  # largest exponent: keeps 9**9**9 from eating the machine


def calc(expr: str) -> str:
    """The value of an arithmetic expression (numbers, + − × ÷ // % **, parentheses), as
    text: an integer when the value is whole. Raises ValueError naming what is not allowed."""
    expr = expr.strip().replace("×", "*").replace("÷", "/")
    if not expr or len(expr) > MAX_EXPR:
        raise ValueError(f"expression must be 1 to {MAX_EXPR} characters")
    try:
        tree = ast.parse(expr, mode="eval")
    except SyntaxError:
        raise ValueError(f"not an arithmetic expression: {expr!r}") from None

    def ev(node: ast.AST) -> int | float:
        if isinstance(node, ast.Constant) and type(node.value) in (int, float):
            return node.value
        if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
            return _UNARY[type(node.op)](ev(node.operand))
        if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
            a, b = ev(node.left), ev(node.right)
            if isinstance(node.op, ast.Pow) and abs(b) > MAX_POWER:
                raise ValueError(f"exponent {b} is larger than {MAX_POWER}")
            return _BINARY[type(node.op)](a, b)
        raise ValueError(f"not allowed in an expression: {ast.unparse(node)!r}")

    try:
        value = ev(tree.body)
    except ZeroDivisionError:
        raise ValueError("division by zero") from None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return str(round(value, 10) if isinstance(value, float) else value)


def _calc_call(args: dict) -> str:
    expr = args.get("expr")
    if not isinstance(expr, str):
        raise ValueError("calc takes {'expr': '<expression>'}")
    return calc(expr)


# name -> (schema, implementation taking the call's arguments)
TOOLS: dict[str, tuple[dict, Callable[[dict], str]]] = {"calc": (CALC_SCHEMA, _calc_call)}


def pick(names: list[str]) -> list[dict]:
    """The schemas of the named built-in tools (a `UserError` for an unknown one)."""
    unknown = [n for n in names if n not in TOOLS]
    if unknown:
        raise UserError(f"unknown tool {unknown[0]!r} (built-in: {', '.join(TOOLS)})")
    return [TOOLS[n][0] for n in names]


def run(name: str, arguments: dict) -> str:
    """A call's result as the tool message's text; `error: …` when it cannot be answered."""
    if name not in TOOLS:
        return f"error: no tool named {name!r}"
    try:
        return TOOLS[name][1](arguments)
    except (ValueError, TypeError, OverflowError) as e:
        return f"error: {e}"


def describe(name: str, arguments: dict, result: str) -> str:
    """One line for the chat display: `calc({"expr": "12*3"}) → 36`."""
    return f"{name}({json.dumps(arguments, ensure_ascii=False)}) → {result}"
