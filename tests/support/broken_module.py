"""A module that raises as it is imported: OPSPOLISH_JOB_MODULES or OPSPOLISH_PROVIDER naming it is bad input (exit 2,
the module and its error named), not an internal error."""

RATIO = 1 / 0
