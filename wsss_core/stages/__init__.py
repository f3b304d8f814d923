"""One function per pipeline stage; the Snakemake ``workflow_scripts`` call these and nothing else."""
