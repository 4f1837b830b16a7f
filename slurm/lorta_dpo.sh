#!/usr/bin/env bash
#SBATCH --job-name=lorta-dpo
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=1
#SBATCH --cpus-per-task=16
#SBATCH --time=24:00:00
#SBATCH --requeue
#SBATCH --signal=B:USR1@300
#SBATCH --output=%x-%j.out
# LoRTA (CP) DPO on the orca DPO pairs (beta 0.1). Submit from the repository root:
#   sbatch slurm/lorta_dpo.sh
set -euo pipefail
cd "${SLURM_SUBMIT_DIR:-$(dirname "$0")/..}"
export CONFIG=${CONFIG:-configs/lorta_dpo.yaml}
source slurm/launch.sh
