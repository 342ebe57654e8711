"""Training-time filters over stored quality scores: a tiny, safe expression language.

``classifier.p_label >= 0.5 and source_distance.value >= 0.05`` is parsed with Python's own
parser into a syntax tree, and only these nodes are accepted: ``and``, ``or``, ``not``,
parentheses, comparisons (``< <= > >= == !=``, chained too), numbers, and column names written
``scorer.column``. ``and``, ``or``, ``not`` and the whole filter take conditions (comparisons or
and/or/not of them), never a bare column or number, which would keep every nonzero (and NaN)
value. Nothing is evaluated by Python: the tree is walked over numpy columns.
A bad filter is a ConfigError that names what is wrong (an unknown column: the columns there are).
"""

from __future__ import annotations

import ast
import operator
from typing import Any, Callable, Mapping, Optional

import numpy as np

from .errors import ConfigError

__all__ = ["parse_filter", "Filter"]

_COMPARE: dict[type, Callable[[Any, Any], Any]] = {
    ast.Lt: operator.lt, ast.LtE: operator.le, ast.Gt: operator.gt, ast.GtE: operator.ge,
    ast.Eq: operator.eq, ast.NotEq: operator.ne,
}
# operators as written: ast.unparse shows an operator node alone as ''
_REFUSED_OPERATORS = {ast.In: "in", ast.NotIn: "not in", ast.Is: "is", ast.IsNot: "is not"}


class Filter:
    """A parsed filter: `columns` it reads (scorer -> column names) and `mask(tables)`."""

    def __init__(self, text: str, tree: ast.AST, columns: dict[str, set[str]]) -> None:
        self.text, self._tree, self.columns = text, tree, columns

    def mask(self, values: Mapping[str, np.ndarray]) -> np.ndarray:
        """Boolean mask from `values`: "scorer.column" -> array (all the same length).

        A missing score (NaN) makes a comparison unknown, as NULL does in SQL: `not` of unknown is
        unknown, `and` is false when either side is, `or` true when either side is, and a row whose
        filter stays unknown is dropped, however the condition is written (`x >= 0.5` and
        `not x < 0.5` drop the same rows)."""
        truth, known = self._condition(self._tree.body, values)  # type: ignore[attr-defined]
        return np.asarray(truth & known, dtype=bool)

    def _condition(self, node: ast.AST, values: Mapping[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """(truth, known) of a condition, row by row; truth is False where unknown."""
        if isinstance(node, ast.BoolOp):
            truth, known = self._condition(node.values[0], values)
            for value in node.values[1:]:
                t, k = self._condition(value, values)
                if isinstance(node.op, ast.And):
                    truth, known = _and(truth, known, t, k)
                else:  # known true on either side decides it
                    truth, known = truth | t, (known & k) | truth | t
            return truth, known
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
            truth, known = self._condition(node.operand, values)
            return ~truth & known, known
        # a comparison, chained or not: known where no value it compares is NaN
        left = self._value(node.left, values)  # type: ignore[attr-defined]
        truth, known = None, None
        for op, right_node in zip(node.ops, node.comparators):  # type: ignore[attr-defined]
            right = self._value(right_node, values)
            k = ~np.isnan(np.asarray(left, dtype=float)) & ~np.isnan(np.asarray(right, dtype=float))
            t = np.asarray(_COMPARE[type(op)](left, right), dtype=bool) & k
            truth, known = (t, k) if truth is None else _and(truth, known, t, k)
            left = right
        return truth, known

    def _value(self, node: ast.AST, values: Mapping[str, np.ndarray]) -> Any:
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            return -self._value(node.operand, values)
        if isinstance(node, ast.Attribute):
            return values[f"{node.value.id}.{node.attr}"]  # type: ignore[attr-defined]
        if isinstance(node, ast.Constant):
            return node.value
        raise AssertionError(f"unchecked node {type(node).__name__}")  # parse_filter admits none other


def _and(truth: np.ndarray, known: np.ndarray, t: np.ndarray, k: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(truth, known) of `a and b`: known where both are, or where either is known false."""
    return truth & t, (known & k) | (known & ~truth) | (k & ~t)


def parse_filter(text: str, available: Optional[Mapping[str, set[str]]]) -> Filter:
    """Parse `text` against the score columns `available` (scorer -> its columns); with None,
    only its form is checked (a config, before any scores exist)."""
    try:
        tree = ast.parse(text.strip(), mode="eval")
    except SyntaxError as exc:
        raise ConfigError(f"config field 'synthetic_filter': {text!r} is not a filter ({exc.msg}); write e.g. "
                          "\"classifier.p_label >= 0.5 and source_distance.value >= 0.05\"") from None
    columns: dict[str, set[str]] = {}
    for node in ast.walk(tree):
        if isinstance(node, (ast.Expression, ast.BoolOp, ast.And, ast.Or, ast.Not, ast.USub, ast.Load)) or \
                type(node) in _COMPARE:
            continue
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.Not, ast.USub)):
            continue
        if isinstance(node, ast.Compare):
            continue
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)) and not isinstance(node.value, bool):
            continue
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
            scorer, column = node.value.id, node.attr
            if available is None:
                pass
            elif scorer not in available:
                raise ConfigError(f"config field 'synthetic_filter': no scores {scorer!r} for this synthetic set "
                                  f"(scored: {', '.join(sorted(available)) or 'none'}; run `ray-dafusion score`)")
            elif column not in available[scorer]:
                raise ConfigError(f"config field 'synthetic_filter': unknown column {scorer}.{column}; "
                                  f"{scorer} has {', '.join(sorted(available[scorer]))}")
            columns.setdefault(scorer, set()).add(column)
            continue
        if isinstance(node, ast.Name):  # the scorer part of scorer.column, checked above
            continue
        what = f"operator {_REFUSED_OPERATORS.get(type(node), type(node).__name__)!r}" \
            if isinstance(node, (ast.cmpop, ast.operator, ast.unaryop, ast.boolop)) else repr(ast.unparse(node))
        raise ConfigError(f"config field 'synthetic_filter': {what} is not allowed in a filter "
                          f"(only scorer.column, numbers, comparisons, and/or/not)")
    if not columns:
        raise ConfigError(f"config field 'synthetic_filter': {text!r} names no score column")
    for node in ast.walk(tree):  # a bare name not part of scorer.column
        if isinstance(node, ast.Name) and not any(isinstance(p, ast.Attribute) and p.value is node
                                                  for p in ast.walk(tree)):
            raise ConfigError(f"config field 'synthetic_filter': {node.id!r} is not a column; write scorer.column")
    _check_condition(tree.body)  # type: ignore[attr-defined]
    return Filter(text, tree, columns)


def _check_condition(node: ast.AST) -> None:
    """A condition is a comparison of values, or and/or/not of conditions."""
    if isinstance(node, ast.BoolOp):
        for value in node.values:
            _check_condition(value)
    elif isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
        _check_condition(node.operand)
    elif isinstance(node, ast.Compare):
        for side in (node.left, *node.comparators):
            _check_value(side)
        if not any(isinstance(n, ast.Attribute) for n in ast.walk(node)):  # `or 0 < 1` would keep every row
            raise ConfigError(f"config field 'synthetic_filter': {ast.unparse(node)!r} compares no score column; "
                              "each comparison names a scorer.column")
    else:  # numpy would take it as true wherever it is nonzero, NaN included
        raise ConfigError(f"config field 'synthetic_filter': {ast.unparse(node)!r} is not a condition; and, or, not "
                          "and the whole filter take comparisons, e.g. source_distance.value > 0.05")


def _check_value(node: ast.AST) -> None:
    """A value is scorer.column, a number, or minus a value."""
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
        _check_value(node.operand)
    elif not isinstance(node, (ast.Attribute, ast.Constant)):
        raise ConfigError(f"config field 'synthetic_filter': {ast.unparse(node)!r} is a condition where a comparison "
                          "needs a scorer.column or a number")
