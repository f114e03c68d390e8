"""The packed format (docs/format.md): ``pack`` a run directory into a packed model directory.

Modules, bottom layer first: ``quantize`` (value encodings), ``header`` (safetensors headers),
``validate`` (the format's rules and checks), ``format`` (one packed table: layout, writer,
reader), ``manifest`` (the directory's ``manifest.json``), ``source`` (the run directory ``pack``
reads), ``report`` (what ``pack`` reports), ``stream`` (``pack_table``: one table, streamed) and
``pack``. ``load_packed`` reads a packed directory back into a model.

Submodules are imported on use (``amtl_compress.storage.pack``, ``.format``, ...) so that
importing the package stays cheap.
"""
