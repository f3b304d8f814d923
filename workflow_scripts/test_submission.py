from wsss_core.stages.segmentation import make_test_submission

p = snakemake.params
make_test_submission(p.prepared, p.split, list(snakemake.input.preds), snakemake.output[0], comp=p.comp,
                     log=snakemake.log[0])
