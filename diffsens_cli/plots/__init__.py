"""Figures, grouped by the tasks that draw them (``synthetic``, ``images``, ``influence``,
``evaluation``; ``common`` for what they share). Each function draws from arrays and
returns a matplotlib Figure; a pipeline imports its group as ``plots``."""

import matplotlib

matplotlib.use("Agg")  # before pyplot is imported anywhere: figures are files, never windows
