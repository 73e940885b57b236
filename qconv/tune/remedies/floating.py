"""The last resort: the node kept float."""

from __future__ import annotations

from typing import Iterator

from qconv.plan.overrides import NodeOverride, Overrides
from qconv.tune.remedies import Context
from qconv.tune.trial import Candidate


def propose(ctx: Context, node, method: str, overrides: Overrides) -> Iterator[Candidate]:
    yield Candidate("kept float", f"'{node.name}' float", method, Overrides({node.name: NodeOverride(precision="float")}, {}))
