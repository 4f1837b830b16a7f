#!/usr/bin/env bash
#SBATCH --job-name=tensorft-zero3
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --time=48:00:00
#SBATCH --requeue
#SBATCH --signal=B:USR1@600
#SBATCH --output=%x-%j.out
# Multi-node DeepSpeed ZeRO-3 (bf16 base; ZeRO-3 cannot shard 4/8-bit bases). Submit from the root:
#   sbatch slurm/zero3_multinode.sh
#   CONFIG=configs/lora_alpaca.yaml EXTRA_ARGS="--set distributed.strategy=deepspeed --set distributed.zero_stage=3" sbatch slurm/zero3_multinode.sh
set -euo pipefail
cd "${SLURM_SUBMIT_DIR:-$(dirname "$0")/..}"
export CONFIG=${CONFIG:-configs/lorta_alpaca_zero3.yaml}
source slurm/launch.sh
