"""Structured config schemas (Hydra ConfigStore) and the one place config turns into plain data."""
