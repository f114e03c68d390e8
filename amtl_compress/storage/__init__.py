"""The packed format (docs/format.md): ``pack`` a run directory, ``load_packed`` it into a model.

Submodules are imported on use (``amtl_compress.storage.pack``, ``.load``, ``.format``) so that
importing the package stays cheap.
"""
