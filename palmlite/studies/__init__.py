"""Studies: papermill sweeps of notebooks over parameter grids, with resumable results.

The sweep runner knows nothing about models: it runs notebooks and stores their rows.
"""

from palmlite.studies.results import read_results, record, write_result
from palmlite.studies.runner import draw_figures, run_study
from palmlite.studies.spec import Study, load_studies, load_study

__all__ = ["Study", "load_study", "load_studies", "run_study", "draw_figures", "record", "read_results", "write_result"]
