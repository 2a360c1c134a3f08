"""The cluster side of the playbook: sbatch scripts (slurm/**/*.sh, sharing slurm/common.sh), the GPU facts
(slurm/gpus.tsv) and the submitit launcher (`python -m slurm.submit`). Importing this package does nothing."""
