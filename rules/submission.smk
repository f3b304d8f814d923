# Test-set submission archive in the official PASCAL VOC result format (for the evaluation server).


rule test_submission:
    input:
        preds=shards("seg_pred", "test"),
        manifest=rules.prepare_dataset.output.manifest,
    output:
        archive=out("submission"),
    params:
        job=job_params(comp="comp6"),
    conda:
        ENV
    log:
        f"{L}/{{dataset}}/{{experiment}}/test_submission.log",
    script:
        "../workflow_scripts/test_submission.py"
