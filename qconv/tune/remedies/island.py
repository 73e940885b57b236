"""int16 activations around one node (an a16w8 island): more precision, a little of the int8 speed."""

from __future__ import annotations

from typing import Iterator

from qconv.plan.overrides import NodeOverride, Overrides
from qconv.tune.remedies import Context
from qconv.tune.trial import Candidate


def propose(ctx: Context, node, method: str, overrides: Overrides) -> Iterator[Candidate]:
    yield Candidate("int16 activations (a16w8 island)", f"'{node.name}' int16", method,
                    Overrides({node.name: NodeOverride(precision="int16")}, {}))
