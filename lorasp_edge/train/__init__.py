"""Stage 2, train: LoRA-SP on a plan (adapter, masks, optimizer, data stream, loss, loop, job).

May read plan files (`lorasp_edge.plan`); never imports `export`.
"""
