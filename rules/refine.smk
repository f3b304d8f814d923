# Pseudo-masks: CAMs + chosen background threshold + dense CRF (pydensecrf2), sharded; and their evaluation.


rule refine_crf:
    input:
        cams=all_cam_shards,
        cam_eval=f"{R}/{{dataset}}/{{experiment}}/eval/cams.json",
        manifest=lambda w: manifest(w.dataset),
    output:
        f"{R}/{{dataset}}/{{experiment}}/pseudo_masks/{{shard}}-of-{{nshards}}.h5",
    params:
        prepared=lambda w: prepared(w.dataset),
        split=lambda w: split_name(w.dataset, "train"),
        cfg=lambda w: scfg(w.dataset, w.experiment, "crf"),
        hash=lambda w: crf_hash(w.dataset, w.experiment),
    threads: 2
    conda:
        "../envs/wsss.yaml"
    log:
        f"{L}/{{dataset}}/{{experiment}}/refine_crf/{{shard}}-of-{{nshards}}.log",
    script:
        "../workflow_scripts/refine_crf.py"


rule eval_pseudo_masks:
    input:
        masks=lambda w: pseudo_mask_shards(w.dataset, w.experiment),
        manifest=lambda w: manifest(w.dataset),
    output:
        f"{R}/{{dataset}}/{{experiment}}/eval/pseudo_masks.json",
    params:
        prepared=lambda w: prepared(w.dataset),
        split=lambda w: split_name(w.dataset, "mask_eval"),
        what="pseudo_masks",
    conda:
        "../envs/wsss.yaml"
    log:
        f"{L}/{{dataset}}/{{experiment}}/eval_pseudo_masks.log",
    script:
        "../workflow_scripts/eval_masks.py"
