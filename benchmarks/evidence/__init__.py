"""Evidence with the power to decide (issue 26): paired comparisons of ERM, AMP, SAM and grouped
AMP, narrow enough to choose the group size m and epsilon, on all 10,000 CIFAR-10 test images.

``python -m benchmarks.evidence --preset mlp5k`` trains an MLP on 5,000 CIFAR-10 (JPEG copy)
training images without augmentation: a validation sweep on two seeds chooses epsilon per m (and
SAM's rho) on a held-out slice of the training pool, then every chosen row runs on the final
seeds, paired (the same initialisation and data order per seed in every row). Results go to
``benchmarks/results/evidence_<preset>.json`` after every run (a rerun skips finished runs) and
``.md``. Modules: :mod:`~benchmarks.evidence.presets` (what runs),
:mod:`~benchmarks.evidence.data`, :mod:`~benchmarks.evidence.model`,
:mod:`~benchmarks.evidence.train` (one run), :mod:`~benchmarks.evidence.report` and
:mod:`~benchmarks.evidence.cli`.
"""
