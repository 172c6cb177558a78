"""Qwen3-VL model math: config, vision tower, fusion, decoder (torch and the slot interfaces only).

The public entry points live in their modules: `qvl_pipeline.model.config.ModelConfig` and
`qvl_pipeline.model.qwen3_vl.Qwen3VL`. This package file stays import-light so that `sizing` can be
used without loading torch.
"""
