"""Graph rewrites that apply a QuantPlan."""
