"""The benchmark suites (one file per hot path). lrec_fast is imported here, before any suite
imports torch, so they all run under the OpenMP spin setting that a service importing
lrec_fast first gets (see lrec_fast/__init__.py)."""

import lrec_fast  # noqa: F401
