from wsss_core.stages.weights import fetch

fetch(name=snakemake.wildcards.name, dest=snakemake.output[0], log=snakemake.log[0],
      url=snakemake.params.get("url"))
