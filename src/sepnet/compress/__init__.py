"""Compressors applied to a built network: the `network.compression` list.

Each entry names a registered method, the layers it acts on (globs on qualified module names of
the network, e.g. "head.*" or "backbone.blocks.*.mlp.fc1") and either a budget (target
compression of those layers' parameters, e.g. 10 for 10x fewer) or the method's own options:

    compression:
      - {method: tt, targets: ["head.*"], budget: 50}              # TT layers, ranks picked for 50x
      - {method: separable, targets: ["head.*"], options: {rank: 2}}
      - {method: magnitude, targets: ["*"], budget: 10, options: {scope: global}}

A method is one module of this package: a `Compressor` subclass (usually a `Factorization` or a
`Pruner`) that registers itself by name, its layers deriving from sepnet.factorized.FactorizedLayer
and, where it trains, a `hooks.CompressionHook`. Every module of this package is imported here,
found by listing the package (no hand-kept list), so a new method is one new file.
"""

import importlib
import pkgutil

from sepnet.compress.hooks import CompressionHook, compression_epoch_, compression_loss
from sepnet.compress.prune import remove_pruning_
from sepnet.compress.spec import CompressionSpec, Compressor, compress_, methods

for _module in pkgutil.iter_modules(__path__):  # importing a module registers its compressor
    importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["CompressionSpec", "Compressor", "CompressionHook", "compress_", "methods", "remove_pruning_",
           "compression_loss", "compression_epoch_"]
