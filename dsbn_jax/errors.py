"""The one exception type users see: a problem they can fix, stated in one line."""


class UserError(Exception):
  """Bad input (missing file/dataset, unknown domain, wrong weights...).

  ``dsbn_jax.main`` prints the message as a single line and exits with status 2, no traceback, so the
  message must say what is wrong *and* what to do.
  """
