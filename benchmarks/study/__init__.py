"""Where does AMP help? ERM vs AMP vs SAM where a regulariser matters, on CPU.

A small CIFAR-10 training set (1,000 images of the JPEG copy, 500 more held out for choosing
epsilon and rho, 2,000 test images), schedules long enough that plain training (ERM) drives the
training loss near zero and overfits, two model sizes (:class:`MidCNN` below, three
conv-BatchNorm stages and a BatchNorm hidden layer, at two widths: ``small``, 40k parameters,
and ``mid``, 156k), with and without augmentation.

Tables (each one command, resumable: finished ``(setting, seed)`` runs are kept in the JSON and
not redone; partial results are written after every run)::

    python -m benchmarks.study --preset study-sweep   # epsilon sweeps (both norms, both radii)
                                                       #   and SAM's rho sweep, 2 seeds, no aug
    python -m benchmarks.study --preset study-final   # ERM vs AMP vs SAM vs the cheaper step,
                                                       #   5 paired seeds, with/without aug,
                                                       #   plus the interleaved step-time ratios
    python -m benchmarks.study --preset study-cheap   # AMP at ERM's cost (issue 16): ERM, AMP
                                                       #   and four cheaper variants at AMP's
                                                       #   epsilon, 5 paired seeds, no aug
    python -m benchmarks.study --preset study-grouped-sweep  # grouped ascent (issue 17): per G
                                                       #   (4, 20 at batch 100) AMP's epsilon
                                                       #   and SAM's rho, 2 seeds, no aug
    python -m benchmarks.study --preset study-grouped  # m = 100, 25, 5: ERM (ghost-BN
                                                       #   control per m), AMP, SAM, 5 seeds
    python -m benchmarks.study --preset study-smoke   # CI: synthetic data, a tiny model

Several processes may fill one table at once (``--models``, ``--blocks``, ``--methods`` split
the work; the JSON is locked, merged and rewritten after every run).

(``python -m benchmarks.reproduce --preset study-sweep`` etc. dispatch here.) The final table's
AMP epsilon and SAM rho are chosen per model by *validation* accuracy (a held-out part of the
training pool, never the test set) from the sweep's JSON when the final table is first run, and
kept in its JSON from then on; without a sweep, the fallbacks in :data:`presets.FALLBACK_CHOICE` are
used and the table says so.

``study-cheap`` takes each model's AMP setting from ``study_final.json`` (the same epsilon, norm
and radius for every row) and trains ERM, full AMP, ``drop_in_amp(ascent="momentum")`` (one
gradient per step), ``drop_in_amp(ascent="gradient")`` with K = 1 in a plain loop (two calls,
two gradients and two successive batches per descent step: its run is as long in descent steps
as the others', so it sees twice the batches, at full AMP's cost), AMP on the last 25% of the
steps only (``update(..., ascend=)`` decided in Python), and an ascent on every 8th step
decided in Python with ``reuse_correction=True``; drop-in runs are evaluated at
:func:`amp_optax.unperturbed_params`. Its markdown reports the gain each keeps relative to full
AMP (Fieller interval) and the step time vs ERM.

``study-grouped-sweep`` and ``study-grouped`` study grouped ascent (``grouped_amp(...,
num_groups=G)``, one perturbation per group of m = 100 / G examples, BatchNorm per group):
the sweep searches the ``study_final.json`` AMP row's (radius, norm) family two x3 steps
further down than the ungrouped grid, and SAM's rho (grouped SAM is
``grouped_amp(rho, num_groups=G, inner_lr=1e6, norm="global")``: each group's step to the sphere
along its own gradient), per G, on validation; the table adds per G an ERM with the same
ghost batch norm (the grouped step at epsilon 0), and takes its m = 100 rows (ERM, AMP, SAM)
from ``study_final.json`` (the same runs, not retrained). Its markdown reports per m the gain
over ERM, the difference to the same method at m = 100 and to the ghost-BN ERM of the same m.

The cheaper step (a setting's ``ascent_every`` k > 1: an ascent on every k-th step) is trained
Python-dispatched: ``tx.update(..., ascend=step % k == 0)`` with ``ascend`` static, two jitted
steps (:func:`runner.make_python_dispatched`). amp_optax 0.1 also had a ``lax.cond`` form
(``amp(ascent_every=k)``), the same arithmetic, which XLA:CPU ran several times slower (it runs
convolutions inside a conditional's branches slowly); ``study_final.json``'s step-time table
times both, a new timing only the Python one, the only form 0.2 has.

Every run: SGD with Nesterov momentum 0.9, weight decay 5e-4 (decoupled from the ascent, as in
the authors' code), cosine learning-rate decay; one jitted train step called from Python per
batch (XLA:CPU runs convolutions inside ``lax.scan``/loops far slower). Runs with the same seed
share the initialisation, the data order and the augmentation draws (paired by seed). Reported
per run: final-epoch test and validation accuracy, mean training loss over the last epoch,
and sharpness at the final parameters on a fixed batch of unaugmented training images with
BatchNorm in inference mode (:mod:`amp_optax.diagnostics`: the top Hessian eigenvalue, and the
mean loss increase under random global-norm perturbations of 5% of the parameter norm).
Per setting: mean +- std over seeds, and the mean paired difference to ERM with a 95%
t-interval.

Data: ``--data-dir`` with the official CIFAR-10 "python version", or else the CIFAR-10 JPEG
copy in a data folder beside the checkout (``../shared/data/cifar-10-jpeg/``, whose ``build.py``
writes the subset in the official layout); with neither, the real presets stop with a message
saying so. ``study-smoke`` needs nothing.

The modules, one job each: :mod:`~benchmarks.study.models` (the CNNs),
:mod:`~benchmarks.study.presets` (settings, presets, and choosing the final table's rows from
the sweep), :mod:`~benchmarks.study.data` (loading the subset), :mod:`~benchmarks.study.runner`
(train steps, training runs, evaluation, sharpness, step time),
:mod:`~benchmarks.study.stats` (means and paired intervals), :mod:`~benchmarks.study.report`
(markdown and plots) and :mod:`~benchmarks.study.cli` (the command line and the resumable
table). A new variant of the study is a new :class:`~benchmarks.study.presets.Setting` field
(built in :func:`~benchmarks.study.runner.make_tx`) or a new preset.
"""

from benchmarks.study.cli import main

__all__ = ("main",)
