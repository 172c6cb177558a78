"""Token generation on top of the model's prefill / decode steps."""
