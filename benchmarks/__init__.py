"""Helpers driven by ``scripts/bench.py``: workers that time the harness against hand-written baselines.

Nothing here is imported by the harness or its tests. Every module runs either in a worker
subprocess started by ``scripts/bench.py`` or under a launcher (accelerate launch / torchrun).
"""
