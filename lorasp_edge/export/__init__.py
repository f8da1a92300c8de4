"""Stage 3, export: merge an adapter and write verified models, one writer per format (`formats`).

May read plan files and adapters (`lorasp_edge.plan`, `lorasp_edge.train`); nothing imports it back
except the CLI and `generate`.
"""
