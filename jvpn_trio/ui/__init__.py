"""The live terminal UI: pure views (``views``), keys (``keys``) and the Trio loop (``app``)."""
