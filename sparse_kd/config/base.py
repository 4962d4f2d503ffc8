"""The configuration's error type and the value sets that several stages share."""

class ConfigError(ValueError):
    """A configuration value is missing, unknown, of the wrong type or impossible."""


SHARDING_TYPES = ("table_wise", "row_wise", "column_wise", "table_row_wise", "data_parallel")
QUANT_DTYPES = ("fp32", "fp16", "int8", "int4", "int2")
FILLS = ("zero", "mean", "text", "cluster", "text_cluster")  # compress.pruned_fill (sparse_kd/compress/prune.py)
