"""Studies: papermill sweeps of notebooks over parameter grids, with resumable results.

The sweep runner knows nothing about models: it runs notebooks and stores their rows.
"""

from palmlite.studies.results import read_results, record, write_result
from palmlite.studies.runner import run_study
from palmlite.studies.spec import Study, load_study

__all__ = ["Study", "load_study", "run_study", "record", "read_results", "write_result"]
