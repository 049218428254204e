"""How large a figure may be asked for: one truth for the library and the command line.

Kept apart from :mod:`mudsc.plots` so the CLI can show the caps in ``--help`` without
importing matplotlib.
"""

# Most grid points per landscape axis: each is a full evaluation, and the grid is square.
MAX_RESOLUTION = 50
# Most points on an interpolation path: each evaluates three models on the evaluation set.
MAX_STEPS = 201
