"""Run-time machinery: slot guards for runtime fallback, the generation engine, the pipeline."""
