"""Consecutive groups under a budget (qconv.numeric.packing): what splits a pass when its values do not fit."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from qconv.numeric.packing import consecutive


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 50), max_size=40), st.integers(1, 100))
def test_groups_keep_the_order_fit_the_budget_and_close_only_when_the_next_does_not_fit(costs, budget):
    items = list(enumerate(costs))
    groups = consecutive(items, lambda it: it[1], budget)
    assert [it for g in groups for it in g] == items  # nothing dropped, nothing reordered
    assert all(g for g in groups)
    for g in groups:
        assert len(g) == 1 or sum(c for _, c in g) <= budget  # over budget only as an item alone
    for before, after in zip(groups, groups[1:]):
        assert sum(c for _, c in before) + after[0][1] > budget  # a group closes only when the next item passes it


def test_no_items_no_groups_and_an_oversized_item_stands_alone():
    assert consecutive([], len, 10) == []
    assert consecutive(["ab", "abcdefghijkl", "c"], len, 5) == [["ab"], ["abcdefghijkl"], ["c"]]
