"""Import help for the optional extras: the error that names the extra to install."""

AMP_CHECKOUT_INSTALL = 'pip install -e ".[{extra}]" from the amp_optax checkout'


def missing_extra(
    module: str,
    error: ModuleNotFoundError,
    *,
    package: str,
    display_name: str,
    extra: str,
    requirement: str,
) -> ModuleNotFoundError:
  """The error to raise when ``module`` is imported without an optional dependency.

  Args:
    module: the amp_optax module being imported, e.g. ``"amp_optax.equinox"``.
    error: the ``ModuleNotFoundError`` its import raised.
    package: the top-level import name of the dependency, e.g. ``"equinox"``.
    display_name: how the dependency is called in prose, e.g. ``"Equinox"``.
    extra: the amp_optax extra that installs it, e.g. ``"equinox"``.
    requirement: the pip requirement of the dependency alone, e.g. ``"equinox>=0.13"``.

  Returns:
    An error that says what to install, or ``error`` itself when something other
    than ``package`` is missing (that error already names the culprit).
  """
  if error.name is None or error.name.split(".")[0] != package:
    return error
  install = AMP_CHECKOUT_INSTALL.format(extra=extra)
  return ModuleNotFoundError(
      f"{module} needs {display_name}, which is not installed ({error}). Install the extra: "
      f'{install} (or pip install "{requirement}"). The core transform, amp_optax.amp, needs '
      f"no {display_name}.", name=package)
