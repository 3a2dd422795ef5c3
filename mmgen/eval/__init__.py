"""Evaluation: metrics, benchmark suites and the ShapesWorld scene parser (the exact judge)."""
