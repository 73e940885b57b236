"""Plan-level steps that change weights, not the graph: the int8 region (and so the speed) stays the same.

``bias``: bias correction, the mean shift int8 causes at each layer's output, folded into its bias.
Each step writes what it decided into the plan (``QuantPlan.corrections``), so ``--plan`` reproduces it without
data, and ``corrected`` applies it to the float model before the QDQ rewrite.
"""
