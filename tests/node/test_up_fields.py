"""The local API's `up` body: every declared field takes a value of its type (a merge once dropped a bool)."""

from __future__ import annotations

import pytest

from node.api import UP_FIELDS, BadRequest, _up_args

SAMPLES: dict[type, object] = {str: "x", bool: True, list: [], int: 3, float: 1.5}


@pytest.mark.parametrize("field", sorted(UP_FIELDS))
def test_up_args_accepts_each_field_of_its_type(field: str) -> None:
    want = UP_FIELDS[field]
    kinds = want if isinstance(want, tuple) else (want,)
    value = next(SAMPLES[k] for k in kinds if k in SAMPLES)
    assert _up_args({field: value})[field] == value


def test_up_args_refuses_a_bool_where_a_number_is_wanted() -> None:
    numeric = [k for k, t in UP_FIELDS.items() if (t if isinstance(t, tuple) else (t,)) == (int,)
               or t == (int, float)]
    for k in numeric:
        with pytest.raises(BadRequest, match=f"{k}: wrong type"):
            _up_args({k: True})


def test_up_args_refuses_an_unknown_field() -> None:
    with pytest.raises(BadRequest, match="unknown field 'nope'"):
        _up_args({"nope": 1})
