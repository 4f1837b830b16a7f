#!/usr/bin/env bash
#SBATCH --job-name=lorta-alpaca
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=1
#SBATCH --cpus-per-task=16
#SBATCH --time=24:00:00
#SBATCH --requeue
#SBATCH --signal=B:USR1@300
#SBATCH --output=%x-%j.out
# LoRTA (CP) SFT on Alpaca, Llama-2-7B in nf4. Submit from the repository root:
#   sbatch slurm/lorta_alpaca.sh
#   CONFIG=configs/tt_alpaca.yaml sbatch --nodes 2 --gpus-per-node 8 slurm/lorta_alpaca.sh
set -euo pipefail
cd "${SLURM_SUBMIT_DIR:-$(dirname "$0")/..}"
export CONFIG=${CONFIG:-configs/lorta_alpaca.yaml}
source slurm/launch.sh
