# Cryo-ET arm: annotation patches from tomograms (MemBrain-seg patch corrections),
# merging hand corrections back into training labels, and organelle/membrane
# refinement over a copick project (SABER refine-membranes).


wildcard_constraints:
    run=r"[A-Za-z0-9][A-Za-z0-9._-]*",
    batch=r"[A-Za-z0-9][A-Za-z0-9._-]*",


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
    container:
        container_image("core")
    threads: 1
    resources:
        **site_resources(),
        mem_mb=scaled(4000, "mem_mb"),
        runtime=scaled(30, "runtime"),
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
    container:
        container_image("core")
    threads: 1
    resources:
        **site_resources(),
        mem_mb=scaled(2000, "mem_mb"),
        runtime=scaled(15, "runtime"),
    params:
        merge=stage_params(CRYOET["merge_corrections"]),
    script:
        "../scripts/merge_corrections.py"


rule export_training:
    input:
        merged=lambda wc: expand(
            "results/cryoet/merged/{name}", name=corrected_tomograms()
        ),
        patches=lambda wc: expand(
            "results/cryoet/patches/{name}", name=corrected_tomograms()
        ),
    output:
        training=directory("results/cryoet/training"),
    log:
        "logs/cryoet/export_training.log",
    benchmark:
        "benchmarks/cryoet/export_training.tsv"
    conda:
        conda_env("core")
    container:
        container_image("core")
    threads: 1
    resources:
        **site_resources(),
        mem_mb=scaled(4000, "mem_mb"),
        runtime=scaled(30, "runtime"),
    params:
        names=lambda wc: corrected_tomograms(),
        export=stage_params(CRYOET["export_training"], drop=("enabled",)),
    script:
        "../scripts/export_training.py"


checkpoint copick_runs:
    input:
        config=REFINE["copick_config"] or [],
    output:
        table="results/cryoet/refine/copick_runs.tsv",
    log:
        "logs/cryoet/copick_runs.log",
    benchmark:
        "benchmarks/cryoet/copick_runs.tsv"
    localrule: True
    # copick 1.31 needs zarr 2: the copick rules run in the cryo-ET environment.
    conda:
        conda_env("cryoet")
    container:
        container_image("cryoet")
    threads: 1
    params:
        python=cryoet_python,
        args=copick_args,
        # Relists the project when a run or an input segmentation is added or removed.
        project=copick_project_state,
    shell:
        "{params.python:q} -I -m maskworks.cli -v copick-runs --config {input.config:q} "
        "{params.args} --out {output.table:q} > {log:q} 2>&1"


rule refine_membranes:
    input:
        unpack(refine_inputs),
    output:
        stats="results/cryoet/refine/batches/{batch}_refine_stats.csv",
        qc=report(
            directory("results/cryoet/refine/batches/{batch}_qc"),
            patterns=["{run}_refine_qc.png"],
            caption="report/refine_qc.rst",
            category="cryo-ET",
            subcategory="refinement",
        ),
    log:
        "logs/cryoet/refine_membranes/{batch}.log",
    benchmark:
        "benchmarks/cryoet/refine_membranes/{batch}.tsv"
    conda:
        conda_env("cryoet")
    container:
        container_image("cryoet")
    threads: 1
    resources:
        **site_resources(gpu=gpu_request(REFINE["device"])),
        mem_mb=scaled(8000, "mem_mb"),
        runtime=refine_runtime,
        gpu=gpu_request(REFINE["device"]),
    params:
        python=cryoet_python,
        args=refine_args,
        runs=refine_run_args,
        stores=store_state,
        qc=lambda wc, output: (
            f"--qc-dir {shlex.quote(output.qc)}" if REFINE["qc_pictures"] else ""
        ),
    # Several runs a job (runs_per_job); a run that cannot be refined is skipped with its reason
    # (--keep-going) and the others are written.
    shell:
        "mkdir -p {output.qc:q} && {params.python:q} -I -m maskworks.cli -v refine-membranes "
        "--config {input.config:q} {params.runs} --keep-going {params.qc} "
        "--stats {output.stats:q} {params.args} > {log:q} 2>&1"


rule refine_summary:
    input:
        table="results/cryoet/refine/copick_runs.tsv",
        stats=refine_batch_stats,
    output:
        summary=report(
            "results/cryoet/refine/refine_summary.csv",
            caption="report/refine_summary.rst",
            category="cryo-ET",
            subcategory="refinement",
        ),
    log:
        "logs/cryoet/refine_summary.log",
    localrule: True
    conda:
        conda_env("core")
    container:
        container_image("core")
    threads: 1
    script:
        "../scripts/refine_summary.py"
