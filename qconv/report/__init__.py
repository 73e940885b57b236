"""The report: built from plain values (plan, models, measurements), gated, and written as JSON, HTML and Markdown."""
