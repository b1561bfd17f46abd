"""sepnet's benchmarks: scripts that measure against a baseline run in the same process, each a
module of this package, run from the repository root:

    python -m benchmarks.layers        # separable / TT layers against dense and tensorly-torch
    python -m benchmarks.constraints   # condition-number penalties
    python -m benchmarks.attacks       # ART attacks' throughput, the training step's overhead
    python -m benchmarks.training      # the training application's overhead
    python -m benchmarks.deploy        # file sizes and CPU latency of the exported models
    python -m benchmarks.reproduce     # the CPU study on real images (and its ablations)
    python -m benchmarks.compressors   # every compressor at equal budgets (cells: benchmarks.cells)
    python -m benchmarks.converged     # ... at a converged protocol (via compressors --protocol converged)
    python -m benchmarks.certified     # certified robustness at equal budgets
    python -m benchmarks.certified_long  # long, resumable certified runs toward the target
    python -m benchmarks.gpu           # the GPU paths on a lent card

Shared helpers: benchmarks.common (data, training, evaluation, where figures go); results go to
benchmarks/results/ (one JSON line per finished run), figures to benchmarks/figures/, and
BENCHMARKS.md records what they printed with the command.
"""
