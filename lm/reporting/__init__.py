"""Reporting: the paper's numbers, results read back, tables, plots, the ablation report."""
