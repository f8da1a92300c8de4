"""Stage 1, plan: what fits a memory budget (model catalog, device profiles, memory model, search).

Reads nothing from `train` or `export`; writes the plan file they read.
"""
