"""Command-line interface: thin commands that parse, call the pipeline, and render."""
