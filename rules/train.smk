# Training target (not part of the default target `all`): a model bundle from a training config.
#   snakemake train --config train_config=config/train/sc_csa.yaml train_dir=models/sc_csa
# then run the workflow with `sc_csa: {models: [models/sc_csa]}`. See docs/TRAINING.md.
# train_config is looked up in the working directory, else in the repository (the shipped recipes).
import os

_train_cfg = config.get("train_config") or "config/train/sc_csa.yaml"
_train_cfg_repo = os.path.join(workflow.basedir, _train_cfg)
TRAIN_CONFIG = (_train_cfg_repo if not os.path.isabs(_train_cfg) and not os.path.exists(_train_cfg)
                and os.path.exists(_train_cfg_repo) else _train_cfg)
TRAIN_DIR = config.get("train_dir") or "models/sc_csa"


rule train:
    """k-fold 2D U-Nets (or, kind: meshnet_3d, 3D MeshNet fine-tuning) -> one model bundle (card.yaml,
    fold files, cv_report.json, curves),
    assembled in a hidden sibling folder and renamed into place. The SLURM profile gives this rule
    the GPU, as `infer`."""
    input:
        config=TRAIN_CONFIG,
    output:
        directory(TRAIN_DIR),
    params:
        **PLAN.job_params(SCRIPTS / "train.py", JOB_PYTHON),
        overrides=config.get("train_set") or {},  # a rerun trigger; the job reads them from its config file
    log:
        PLAN.log("train", os.path.basename(os.path.normpath(TRAIN_DIR))),
    threads: 2
    resources:
        mem_mb=16000,
        runtime=120,
    conda:
        "../envs/tensorflow.yaml"
    shell:
        STEP + " {input.config:q} {output:q}"
