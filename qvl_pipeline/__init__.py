"""qvl-pipeline: hardware-aware Qwen3-VL inference."""
