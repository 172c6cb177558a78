"""A plugin module that raises while being imported (a third-party package with a broken dependency)."""

raise RuntimeError("libfancy.so: cannot open shared object file")
