# Volume-EM arm: classical texture tissue mask, then 3-D mask post-processing.


wildcard_constraints:
    name=r"[A-Za-z0-9][A-Za-z0-9._-]*",


rule texture_mask:
    input:
        unpack(em_inputs),
    output:
        mask=directory("results/em/{name}/texture_mask.zarr"),
        confidence=directory("results/em/{name}/texture_confidence.zarr"),
        stats="results/em/{name}/texture_stats.json",
        qc="results/em/{name}/texture_qc.png",
    params:
        texture=stage_params(EM["texture_mask"]),
        geometry=em_geometry,
    log:
        "logs/em/texture_mask/{name}.log",
    benchmark:
        "benchmarks/em/texture_mask/{name}.tsv"
    conda:
        "../envs/core.yaml"
    threads: 1
    resources:
        mem_mb=8000,
        runtime=60,
    script:
        "../scripts/texture_mask.py"


rule postprocess_mask:
    input:
        unpack(lambda wc: {"mask": f"results/em/{wc.name}/texture_mask.zarr", **em_inputs(wc)}),
    output:
        mask=directory("results/em/{name}/mask.zarr"),
        stats="results/em/{name}/mask_stats.json",
        qc="results/em/{name}/mask_qc.png",
    params:
        postprocess=stage_params(EM["postprocess_mask"]),
    log:
        "logs/em/postprocess_mask/{name}.log",
    benchmark:
        "benchmarks/em/postprocess_mask/{name}.tsv"
    conda:
        "../envs/core.yaml"
    threads: 1
    resources:
        mem_mb=4000,
        runtime=30,
    script:
        "../scripts/postprocess_mask.py"
