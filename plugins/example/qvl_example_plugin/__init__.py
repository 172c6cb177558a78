"""Example qvl-pipeline plugin package (see plugins/README.md in the qvl-pipeline repository)."""
