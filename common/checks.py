"""Value checks for config schemas: each field may carry a rule, and every loaded config is checked
against them.

    batch_size: int = checked(4096, at_least(1))
    kernel: str = checked("imq", one_of("imq", "gaussian"))

`check_config` walks a loaded config beside its dataclass schema and raises one UserError for the
first value that breaks its field's rule, naming the key, the value and what is allowed. Every float
anywhere must be finite (NaN and inf are refused without a rule). Checks run when the config loads,
before anything is written."""

from __future__ import annotations

import copy
import dataclasses
import math
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from omegaconf import DictConfig, ListConfig, OmegaConf

from common.errors import UserError


@dataclass(frozen=True)
class Rule:
    allowed: str  # what is allowed, in words: "an integer >= 1", "one of imq, gaussian"
    test: Callable[[Any], bool]


def checked(default: Any, rule: Rule) -> Any:
    """A dataclass field with a default and a rule (lists and dicts get a default factory)."""
    if isinstance(default, (list, dict)):
        return dataclasses.field(
            default_factory=lambda: copy.deepcopy(default), metadata={"check": rule}
        )
    return dataclasses.field(default=default, metadata={"check": rule})


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def at_least(low: float) -> Rule:
    return Rule(f">= {low}", lambda v: _number(v) and v >= low)


def greater_than(low: float) -> Rule:
    return Rule(f"> {low}", lambda v: _number(v) and v > low)


def between(low: float, high: float, *, open_low: bool = False, open_high: bool = False) -> Rule:
    """low <= v <= high (or low < v, v < high)."""
    left, right = "(" if open_low else "[", ")" if open_high else "]"
    return Rule(
        f"in {left}{low}, {high}{right}",
        lambda v: (
            _number(v)
            and (low < v if open_low else low <= v)
            and (v < high if open_high else v <= high)
        ),
    )


def one_of(*choices: Any) -> Rule:
    shown = ", ".join("null" if c is None else str(c) for c in choices)
    return Rule(f"one of {shown}", lambda v: v in choices)


def each(rule: Rule, length: int | None = None, ordered: bool = False, empty: bool = False) -> Rule:
    """A list / tuple whose items all pass `rule` (of `length` items; non-decreasing if `ordered`;
    an empty
    one only if `empty`, whatever `length`)."""
    words = (
        f"{length} values" + (" (or none)" if empty else "")
        if length
        else ("a list of values, possibly empty" if empty else "a list of values")
    )
    words += f", each {rule.allowed}" + (", in non-decreasing order" if ordered else "")

    def test(v: Any) -> bool:
        items = list(v) if isinstance(v, (list, tuple)) else None
        if (
            items is None
            or (not items and not empty)
            or (items and length is not None and len(items) != length)
        ):
            return False
        return all(rule.test(x) for x in items) and (not ordered or items == sorted(items))

    return Rule(words, test)


def optional(rule: Rule) -> Rule:
    return Rule(f"null or {rule.allowed}", lambda v: v is None or rule.test(v))


def existing_file() -> Rule:
    return Rule("an existing file", lambda v: isinstance(v, str) and Path(v).expanduser().is_file())


POSITIVE_INT = at_least(1)
NON_NEGATIVE = at_least(0)
PROBABILITY = between(0, 1)
DEVICE = one_of(None, "cpu", "cuda")


def _non_finite(value: Any) -> bool:
    if isinstance(value, float):
        return not math.isfinite(value)
    if isinstance(value, (list, tuple)):
        return any(_non_finite(v) for v in value)
    return False


def check_config(config: Any, schema: type, prefix: str = "") -> None:
    """Raise UserError for the first value of `config` (a DictConfig of `schema`) that breaks its
    rule."""
    # field.type is a string under `from __future__ import annotations`
    hints = typing.get_type_hints(schema)
    for field in dataclasses.fields(schema):
        key = f"{prefix}{field.name}"
        value = config[field.name]
        nested = hints.get(field.name)
        if dataclasses.is_dataclass(nested):
            check_config(value, nested, f"{key}.")
            continue
        plain = (
            OmegaConf.to_container(value, resolve=True)
            if isinstance(value, (DictConfig, ListConfig))
            else value
        )
        if _non_finite(plain):
            raise UserError(f"config key '{key}' is {plain}; it must be a finite number")
        rule = field.metadata.get("check")
        if rule is not None and not rule.test(plain):
            raise UserError(f"config key '{key}' is {plain!r}; it must be {rule.allowed}")
