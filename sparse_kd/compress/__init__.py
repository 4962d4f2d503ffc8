"""Compression stage over a trained student: row importance (:mod:`.importance`), row pruning with
id remaps (:mod:`.prune`), per-table quantization onto FBGEMM's inference TBE (:mod:`.quantize`),
a byte-budget planner (:mod:`.planner`), the serving artifact (:mod:`.artifact`) and the stage
entry point :func:`sparse_kd.compress.stage.compress_run`.

Nothing is imported here, so ``import sparse_kd.compress.<module>`` stays cheap.
"""
