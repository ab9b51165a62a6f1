"""Launch sizes as expressions of the layer's shapes, written once and used twice: evaluated on
Python integers (align.py's buffer sizes, tests) and rendered as C++ for the TensorRT plugin
(ce_kernels.aot writes them into the generated launch code).

Shapes: T tokens, H hidden, I intermediate, C = ces.shape[2] (0 without CE), E experts, K top_k,
KM = K - n_ce main experts per token. Everything is a non-negative integer, so `//` (floor) and
C++'s `/` (truncation) agree.

    max_blocks(T * KM, E, 64) * cdiv(I, 128)   # an int for ints, an Expr for symbols
    cpp(expr) -> "max_blocks(d.T * d.KM, d.E, 64) * cdiv(d.I, 128)"

In C++ the names are members of `ce_trt::Dims` (overflow-checked 64-bit integers,
plugins/trt/src/kernel_set.h) and cdiv / smaller / larger are that header's functions; everything else
(max_padded_pairs, max_blocks, ...) is expanded here, so the formulas exist only in this file.
"""

from __future__ import annotations

import re
from typing import Union


class Expr:
    """An integer expression over the shape symbols; + - * // with ints or other expressions."""

    def __init__(self, text: str, evaluate, precedence: int = 3):
        self.text, self._evaluate, self.precedence = text, evaluate, precedence

    def __call__(self, shapes: dict[str, int]) -> int:
        return int(self._evaluate(shapes))

    def __repr__(self) -> str:
        return self.text

    def _binary(self, other, symbol: str, precedence: int, op, swap: bool = False) -> "Expr":
        left, right = (as_expr(other), self) if swap else (self, as_expr(other))
        # Left-associative: the right operand needs brackets at equal precedence.
        text = f"{_wrap(left, precedence)} {symbol} {_wrap(right, precedence + 1)}"
        return Expr(text, lambda s: op(left(s), right(s)), precedence)

    def __add__(self, other): return self._binary(other, "+", 1, lambda a, b: a + b)
    def __radd__(self, other): return self._binary(other, "+", 1, lambda a, b: a + b, swap=True)
    def __sub__(self, other): return self._binary(other, "-", 1, lambda a, b: a - b)
    def __rsub__(self, other): return self._binary(other, "-", 1, lambda a, b: a - b, swap=True)
    def __mul__(self, other): return self._binary(other, "*", 2, lambda a, b: a * b)
    def __rmul__(self, other): return self._binary(other, "*", 2, lambda a, b: a * b, swap=True)
    def __floordiv__(self, other): return self._binary(other, "/", 2, lambda a, b: a // b)
    def __rfloordiv__(self, other): return self._binary(other, "/", 2, lambda a, b: a // b, swap=True)


Value = Union[int, Expr]


def _wrap(expr: Expr, precedence: int) -> str:
    return f"({expr.text})" if expr.precedence < precedence else expr.text


def as_expr(value: Value) -> Expr:
    if isinstance(value, Expr):
        return value
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"shape expressions take ints, got {value!r}")
    return Expr(str(value), lambda _: value)


def symbol(name: str) -> Expr:
    return Expr(name, lambda shapes: shapes[name])


T, H, I, C, E, K, KM = (symbol(name) for name in ("T", "H", "I", "C", "E", "K", "KM"))
SYMBOLS = ("T", "H", "I", "C", "E", "K", "KM")


def _call(name: str, function, *args: Value) -> Value:
    if not any(isinstance(a, Expr) for a in args):
        return function(*args)
    exprs = [as_expr(a) for a in args]
    return Expr(f"{name}({', '.join(e.text for e in exprs)})", lambda s: function(*(e(s) for e in exprs)))


def cdiv(a: Value, b: Value) -> Value:
    return _call("cdiv", lambda x, y: (x + y - 1) // y, a, b)


def smaller(a: Value, b: Value) -> Value:
    return _call("smaller", min, a, b)


def larger(a: Value, b: Value) -> Value:
    return _call("larger", max, a, b)


def largest(values: list[Value]) -> Value:
    """The largest of `values`, as one expression (equal expressions once)."""
    distinct = list({str(value): value for value in values}.values())
    result = distinct[0]
    for value in distinct[1:]:
        result = larger(result, value)
    return result


def max_padded_pairs(num_pairs: Value, num_experts: Value, block_m: Value) -> Value:
    """Worst case of sum_e roundup(count_e, block_m): every non-empty expert wastes < block_m."""
    return num_pairs + smaller(num_experts, num_pairs) * (block_m - 1)


def max_blocks(num_pairs: Value, num_experts: Value, block_m: Value) -> Value:
    return cdiv(max_padded_pairs(num_pairs, num_experts, block_m), block_m)


def cpp(value: Value) -> str:
    """The C++ spelling: the symbols become members of `Dims const& d`."""
    text = as_expr(value).text
    for name in sorted(SYMBOLS, key=len, reverse=True):
        text = _replace_word(text, name, f"d.{name}")
    return text


def _replace_word(text: str, word: str, replacement: str) -> str:
    return re.sub(rf"(?<![\w.]){word}(?!\w)", replacement, text)
