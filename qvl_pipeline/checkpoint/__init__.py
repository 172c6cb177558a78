"""Hugging Face checkpoint folders: read them into a module (memory-mapped where possible) and write them."""

from qvl_pipeline.checkpoint.config import config_dtype, parse_dtype, read_config, resolve_dtype, ties_word_embeddings
from qvl_pipeline.checkpoint.files import WeightFiles, find_weight_files
from qvl_pipeline.checkpoint.header import ShardHeader, TensorInfo, read_header
from qvl_pipeline.checkpoint.reader import LoadReport, load_checkpoint
from qvl_pipeline.checkpoint.writer import parse_size, save_checkpoint

__all__ = [
    "LoadReport", "ShardHeader", "TensorInfo", "WeightFiles", "config_dtype", "find_weight_files", "load_checkpoint",
    "parse_dtype", "parse_size", "read_config", "read_header", "resolve_dtype", "save_checkpoint",
    "ties_word_embeddings",
]
