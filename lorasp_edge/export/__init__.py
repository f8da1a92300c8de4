"""Stage 3, export: one way through (`run.export`) from a source of weights (`sources/`: in memory,
streamed from the base's shards, or the adapter unmerged) to every requested format (`formats/`), each
written and verified by the runtime that will run it.

May read plan files and adapters (`lorasp_edge.plan`, `lorasp_edge.train`); nothing imports it back
except the CLI and `generate`.
"""
