"""One function per pipeline stage; the Snakemake ``workflow_scripts`` call them through :func:`run_job`."""

from .job import Files, JobSettings, run_job

__all__ = ["Files", "JobSettings", "run_job"]
