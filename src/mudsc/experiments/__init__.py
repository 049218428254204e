"""``mudsc experiment``: a YAML config run end to end, resumable, with a report.

:func:`run_experiment` runs any kind of experiment (classification pairs, heterogeneous
tasks) through one runner; each kind is one :class:`PoolEntry` in :data:`POOLS`;
:func:`check_experiment` validates a config against its data.
"""

from mudsc.experiments.config import ExperimentConfig, load_config, parse_config
from mudsc.experiments.runner import POOLS, PoolEntry, check_experiment, run_experiment

__all__ = [
    "POOLS",
    "ExperimentConfig",
    "PoolEntry",
    "check_experiment",
    "load_config",
    "parse_config",
    "run_experiment",
]
