# Cryo-ET arm: annotation patches from tomograms (MemBrain-seg patch corrections),
# merging hand corrections back into training labels, and organelle/membrane
# refinement over a copick project (SABER refine-membranes).


wildcard_constraints:
    run=r"[A-Za-z0-9][A-Za-z0-9._-]*",


rule extract_patches:
    input:
        unpack(cryoet_inputs),
    output:
        patches=report(
            directory("results/cryoet/patches/{name}"),
            patterns=["{qcname}_qc.png"],
            caption="report/patches_qc.rst",
            category="cryo-ET",
            subcategory="patches",
        ),
    log:
        "logs/cryoet/extract_patches/{name}.log",
    benchmark:
        "benchmarks/cryoet/extract_patches/{name}.tsv"
    group:
        "cryoet_patches"
    conda:
        conda_env("core")
    threads: 1
    resources:
        **site_resources(),
        mem_mb=scaled(4000),
        runtime=scaled(30),
    params:
        extract=stage_params(CRYOET["extract_patches"]),
        token=lambda wc: wc.name,
    script:
        "../scripts/extract_patches.py"


rule merge_corrections:
    input:
        patches="results/cryoet/patches/{name}",
        corrections=lambda wc: cryoet_row(wc)["corrections"],
    output:
        merged=directory("results/cryoet/merged/{name}"),
    log:
        "logs/cryoet/merge_corrections/{name}.log",
    benchmark:
        "benchmarks/cryoet/merge_corrections/{name}.tsv"
    # A short step: submitted together with the extraction of the same tomogram.
    group:
        "cryoet_patches"
    conda:
        conda_env("core")
    threads: 1
    resources:
        **site_resources(),
        mem_mb=scaled(2000),
        runtime=scaled(15),
    params:
        merge=stage_params(CRYOET["merge_corrections"]),
    script:
        "../scripts/merge_corrections.py"


rule refine_membranes:
    input:
        unpack(refine_inputs),
    output:
        qc=report(
            "results/cryoet/refine/{run}_refine_qc.png",
            caption="report/refine_qc.rst",
            category="cryo-ET",
            subcategory="refinement",
        ),
        stats=report(
            "results/cryoet/refine/{run}_refine_stats.csv",
            caption="report/refine_qc.rst",
            category="cryo-ET",
            subcategory="refinement",
        ),
    log:
        "logs/cryoet/refine_membranes/{run}.log",
    benchmark:
        "benchmarks/cryoet/refine_membranes/{run}.tsv"
    conda:
        conda_env("core")
    threads: 1
    resources:
        **site_resources(gpu=gpu_request(REFINE["device"])),
        mem_mb=scaled(8000),
        runtime=scaled(60),
        gpu=gpu_request(REFINE["device"]),
    params:
        refine=stage_params(REFINE, drop=("copick_config", "runs", "device")),
        device=job_device(REFINE["device"]),
        stores=store_state,
    script:
        "../scripts/refine_membranes.py"
