"""The application built on the kernel library: ``ep-train`` and ``ep-gradcheck``.

Like torchvision's ``references/``, this is one program that uses ``ep_kernels``, not part of
it: the library (everything in ``ep_kernels`` outside this folder) needs only torch, while
the application also needs numpy, matplotlib, tqdm and scikit-learn, installed with the
``train`` extra (``pip install ".[train]"``).

- ``train``: the ``ep-train`` command line (options, resume checks, ``main``);
  ``python -m ep_kernels.app.train`` is the same, and what ``torchrun -m`` starts.
- ``trainer``: ``Trainer``, one run: setup, one step, one epoch, evaluation, saving, the
  interrupt / out-of-time / done endings; ``train()`` runs one.
- ``config``: the run's configuration: defaults, ``UsageError``, signals from a config.
- ``checkpoint``: the run folder's files: atomic writes, random generators' states, loading and
  checking a checkpoint, the run folder's lock, the clean-up after a killed write.
- ``metrics``: an epoch's running sums, the summary, ``curves.png`` and ``diagnostics.png``.
- ``data``: datasets in memory (the bundled digits, torchvision's MNIST and CIFAR).
- ``distributed``: data-parallel training under ``torchrun``.
- ``teacher``: training the distillation teacher by backprop, and a run's teacher.
- ``gradcheck``: the ``ep-gradcheck`` command line (the check itself is
  ``ep_kernels.gradcheck.gradcheck``).

Nothing is imported here (``python -m ep_kernels.app.train`` runs the module once); a missing
dependency is named, with the command that installs it.
"""
import importlib.util

# import name -> distribution name, of the `train` extra
REQUIREMENTS = {"numpy": "numpy", "matplotlib": "matplotlib", "tqdm": "tqdm", "sklearn": "scikit-learn"}

_missing = [dist for mod, dist in REQUIREMENTS.items() if importlib.util.find_spec(mod) is None]
if _missing:
    raise ImportError(f"ep_kernels.app (ep-train, ep-gradcheck) needs {', '.join(_missing)}, which "
                      f"{'is' if len(_missing) == 1 else 'are'} not installed: pip install 'ep_kernels[train]' "
                      f"(or pip install {' '.join(_missing)}); the library itself needs only torch")
