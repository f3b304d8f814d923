# Multi-scale + flip CAMs (sharded HDF5) and their evaluation (threshold curve, chosen background threshold).


rule infer_cams:
    input:
        model=f"{R}/{{dataset}}/{{experiment}}/classifier/model.pt",
        manifest=lambda w: manifest(w.dataset),
    output:
        f"{R}/{{dataset}}/{{experiment}}/cams/{{split}}/{{shard}}-of-{{nshards}}.h5",
    params:
        prepared=lambda w: prepared(w.dataset),
        cfg=lambda w: scfg(w.dataset, w.experiment, "cams"),
        hash=lambda w: cams_hash(w.dataset, w.experiment),
        seed=config["seed"],
        device=config["device"],
        locks=GPU_LOCKS,
    threads: 2
    resources:
        gpu=1,
    conda:
        "../envs/wsss.yaml"
    log:
        f"{L}/{{dataset}}/{{experiment}}/infer_cams/{{split}}_{{shard}}-of-{{nshards}}.log",
    script:
        "../workflow_scripts/infer_cams.py"


rule eval_cams:
    input:
        cams=all_cam_shards,
        manifest=lambda w: manifest(w.dataset),
    output:
        f"{R}/{{dataset}}/{{experiment}}/eval/cams.json",
    params:
        prepared=lambda w: prepared(w.dataset),
        threshold_split=lambda w: split_name(w.dataset, "threshold"),
        eval_split=lambda w: split_name(w.dataset, "eval"),
        cfg=lambda w: scfg(w.dataset, w.experiment, "eval"),
    conda:
        "../envs/wsss.yaml"
    log:
        f"{L}/{{dataset}}/{{experiment}}/eval_cams.log",
    script:
        "../workflow_scripts/eval_cams.py"
