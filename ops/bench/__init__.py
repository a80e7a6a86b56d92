"""Side-by-side benchmarks (issue 5): each runs berthd and its anchor in one run on the
same machine and prints ratios. Run from the repository root, e.g.
``.venv/bin/python -m ops.bench.appends --quick``."""
