"""Export: the deliverable a product ships, a model that runs on its board without edgekit.

`bundle` writes one folder (or a byte-for-byte reproducible `.tar.gz`) holding the model compiled
for the device's target, TVM's C++ runtime for the device's architecture (`runtime`, taken from the
apache-tvm wheels), a small C++ runner built with the device's compiler (`runner`, source in
`runner.cc`), a sample input with PyTorch's outputs, and a manifest with every file's sha256. It
sits on the build stage (compile, cached) and below run, which ships a bundle to a board.
"""

from hostkit.export.bundle import Bundle, export_bundle, write_archive

__all__ = ["Bundle", "export_bundle", "write_archive"]
