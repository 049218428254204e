"""``mudsc experiment``: a YAML config run end to end, resumable, with a report.

:func:`run_experiment` runs any kind of experiment (classification pairs, heterogeneous
tasks) through one runner; :func:`check_experiment` validates a config against its data.
"""

from mudsc.experiments.config import ExperimentConfig, load_config, parse_config
from mudsc.experiments.runner import check_experiment, run_experiment

__all__ = ["ExperimentConfig", "check_experiment", "load_config", "parse_config", "run_experiment"]
