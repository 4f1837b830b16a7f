#!/usr/bin/env bash
# Shared launch logic for the sbatch scripts in this folder (sourced, not submitted).
#
# One `srun` task per node starts `torchrun`, which starts one process per GPU; the
# rendezvous is on the job's first node. SIGUSR1 (sent by SLURM before the time limit or
# on preemption, see --signal in the scripts) is forwarded: the trainer writes a checkpoint
# and exits, and the job requeues itself; the re-run resumes from that checkpoint.
# Signal lead time (--signal=B:USR1@N): the ranks agree on the signal at the next step end,
# then write the checkpoint, so N must cover one optimizer step (grad_accum micro-batches) plus
# the write. The checkpoint holds the adapter and its AdamW state only, never the base: Llama-2-7B
# LoRA r=32 on all 7 projections is 915 MiB, written and fsynced in 1.6 s on a local disk
# (bench/checkpoint_save.py; run it on your checkpoint filesystem); CP/TT adapters are far
# smaller. The scripts ask for 300 s (600 s multi-node): minutes of margin for a slow step or
# filesystem.
#
# Environment overrides: CONFIG, EXTRA_ARGS, GPUS_PER_NODE, MASTER_ADDR, MASTER_PORT,
# PYTHON (default .venv/bin/python if present), NCCL_* (passed through).
set -euo pipefail

: "${CONFIG:?set CONFIG to a YAML config}"
EXTRA_ARGS=${EXTRA_ARGS:-}
NNODES=${SLURM_NNODES:-1}
GPUS_PER_NODE=${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-$(nvidia-smi -L 2>/dev/null | wc -l || echo 1)}}
[ "${GPUS_PER_NODE}" -ge 1 ] 2>/dev/null || GPUS_PER_NODE=1
MASTER_ADDR=${MASTER_ADDR:-$(scontrol show hostnames "${SLURM_JOB_NODELIST:-localhost}" | head -n 1)}
MASTER_PORT=${MASTER_PORT:-$((20000 + ${SLURM_JOB_ID:-0} % 20000))}
if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python; fi
fi

# NCCL: fail fast instead of hanging on a dead peer; InfiniBand when present.
export NCCL_ASYNC_ERROR_HANDLING=${NCCL_ASYNC_ERROR_HANDLING:-1}
export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}
export NCCL_IB_DISABLE=${NCCL_IB_DISABLE:-0}
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
export MASTER_ADDR MASTER_PORT

echo "tensorft: ${NNODES} node(s) x ${GPUS_PER_NODE} process(es), rendezvous ${MASTER_ADDR}:${MASTER_PORT}, config ${CONFIG}"

# shellcheck disable=SC2016  # expanded by the per-node shell, where SLURM_NODEID is set
srun --kill-on-bad-exit=1 --ntasks-per-node=1 --nodes="${NNODES}" bash -c \
  '"$0" -m torch.distributed.run --nnodes "$1" --nproc_per_node "$2" --node_rank "${SLURM_NODEID:-0}" \
     --rdzv_backend c10d --rdzv_endpoint "$3:$4" --rdzv_id "${SLURM_JOB_ID:-local}" \
     launcher/train.py --config "$5" ${6}' \
  "${PYTHON}" "${NNODES}" "${GPUS_PER_NODE}" "${MASTER_ADDR}" "${MASTER_PORT}" "${CONFIG}" "${EXTRA_ARGS}" &
SRUN_PID=$!

on_preempt() {
  echo "tensorft: preemption signal; asking the trainer to checkpoint"
  # TERM, not USR1: srun relays it to the tasks and torchrun relays it to every rank
  # (torchrun does not relay USR1); the trainer checkpoints on either.
  kill -TERM "${SRUN_PID}" 2>/dev/null || true
  wait "${SRUN_PID}" || true
  if [ -n "${SLURM_JOB_ID:-}" ]; then scontrol requeue "${SLURM_JOB_ID}"; fi
  exit 0
}
trap on_preempt USR1 TERM

wait "${SRUN_PID}"
