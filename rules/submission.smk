# Test-set submission archive in the official PASCAL VOC result format (for the evaluation server).


rule test_submission:
    input:
        preds=lambda w: seg_pred_shards(w.dataset, w.experiment, split_name(w.dataset, "test")),
        manifest=lambda w: manifest(w.dataset),
    output:
        f"{R}/{{dataset}}/{{experiment}}/submission/results.tar.gz",
    params:
        prepared=lambda w: prepared(w.dataset),
        split=lambda w: split_name(w.dataset, "test"),
        comp="comp6",
    conda:
        "../envs/wsss.yaml"
    log:
        f"{L}/{{dataset}}/{{experiment}}/test_submission.log",
    script:
        "../workflow_scripts/test_submission.py"
