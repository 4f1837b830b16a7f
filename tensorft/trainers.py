"""Trainers composed from trl: adapter-only checkpoints that are atomic, DPO's reference as the
same model with its adapters switched off, metrics, and checkpoint-on-signal.

trl's SFTTrainer and DPOTrainer do the training loop; the mixin below changes what a
checkpoint holds (the adapter, not the base weights; gathered when sharded; the optimizer of a
self-sharded FSDP2 model) and how one is marked complete, and lets a quantized base with a
tensorft adapter past transformers' "purely quantized model" check.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import time

import torch
from transformers import TrainerCallback
from trl import DPOTrainer, SFTTrainer

from .distributed import full_adapter_state, is_fsdp2
from .model import disable_adapters, unwrap
from .saving import atomic_file, load_adapter_weights, save, write_json, write_text

COMPLETE = "COMPLETE"  # written last into a checkpoint directory: only then does it count
CHECKPOINT_PREFIX = "checkpoint-"
OPTIMIZER_FILE, SCHEDULER_FILE = "optimizer.pt", "scheduler.pt"  # the Trainer's names


def checkpoint_step(name: str) -> int | None:
    if not name.startswith(CHECKPOINT_PREFIX):
        return None
    tail = name[len(CHECKPOINT_PREFIX):]
    return int(tail) if tail.isdigit() else None


def complete_checkpoints(directory: str) -> list[str]:
    """Complete checkpoint directories, oldest first."""
    if not os.path.isdir(directory):
        return []
    found = []
    for name in os.listdir(directory):
        step = checkpoint_step(name)
        path = os.path.join(directory, name)
        if step is not None and os.path.isfile(os.path.join(path, COMPLETE)):
            found.append((step, path))
    return [p for _, p in sorted(found)]


def newest_complete_checkpoint(directory: str) -> str | None:
    found = complete_checkpoints(directory)
    return found[-1] if found else None


class AdapterTrainerMixin:
    """Mixin for transformers/trl trainers that train a tensorft adapter: checkpoints hold only
    the adapter weights (plus optimizer, scheduler, RNG and trainer state, which the Trainer
    writes as usual); a checkpoint counts once its COMPLETE marker exists, and old ones are
    rotated only after; sharded adapters (FSDP2, ZeRO-3) are gathered to save."""

    keep_checkpoints: int = 2

    def __init__(self, *args, model=None, **kwargs):
        # transformers refuses to train a quantized model unless PEFT adapters are loaded
        # (its flag `_hf_peft_config_loaded`); tensorft's adapters play that role. The flag is
        # raised for that check only, so no other PEFT code path sees it.
        flagged = model is not None and getattr(model, "is_quantized", False)
        if flagged:
            model._hf_peft_config_loaded = True
        try:
            super().__init__(*args, model=model, **kwargs)
        finally:
            if flagged:
                model._hf_peft_config_loaded = False

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        # Every rank gathers (sharded adapters: FSDP2, ZeRO-3), rank 0 writes. Only the adapter:
        # the Trainer's own save would consolidate the whole base model under ZeRO-3.
        tensors = full_adapter_state(self.model)
        if self.args.should_save:
            save(unwrap(self.model), output_dir or self.args.output_dir, tensors)

    def _save(self, output_dir: str | None = None, state_dict=None) -> None:
        save(unwrap(self.model), output_dir or self.args.output_dir)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        load_adapter_weights(unwrap(model or self.model), resume_from_checkpoint)

    def _save_checkpoint(self, model, trial) -> None:
        super()._save_checkpoint(model, trial)
        folder = os.path.join(self.args.output_dir, f"{CHECKPOINT_PREFIX}{self.state.global_step}")
        if is_fsdp2(self.model):
            self._save_fsdp2_training_state(folder)
        self.accelerator.wait_for_everyone()  # every rank's files are written before COMPLETE
        if not self.args.should_save:
            return
        write_text(os.path.join(folder, COMPLETE), f"{self.state.global_step}\n")
        self._rotate()

    # FSDP2: the Trainer does not checkpoint the optimizer of a model that shards itself
    # (it asks for save_only_model), so the sharded optimizer state is gathered into one full
    # state dict with torch.distributed.checkpoint's API and scattered back on resume.

    def _save_fsdp2_training_state(self, folder: str) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        optim = get_optimizer_state_dict(self.model, self.optimizer, options=options)
        if self.args.should_save:
            with atomic_file(os.path.join(folder, OPTIMIZER_FILE)) as tmp:
                torch.save(optim, tmp)
            with atomic_file(os.path.join(folder, SCHEDULER_FILE)) as tmp:
                torch.save(self.lr_scheduler.state_dict(), tmp)
        self._save_rng_state(folder)  # one file per rank

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        if checkpoint is None or not is_fsdp2(self.model):
            return super()._load_optimizer_and_scheduler(checkpoint)
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        optim = torch.load(os.path.join(checkpoint, OPTIMIZER_FILE), map_location="cpu", weights_only=True)
        set_optimizer_state_dict(self.model, self.optimizer, optim, options=StateDictOptions(full_state_dict=True))
        sched = torch.load(os.path.join(checkpoint, SCHEDULER_FILE), map_location="cpu", weights_only=True)
        self.lr_scheduler.load_state_dict(sched)

    def _rotate(self) -> None:
        # Incomplete leftovers of a killed run, then all but the newest ``keep_checkpoints``.
        root = self.args.output_dir
        complete = complete_checkpoints(root)  # oldest first; includes the one just marked
        for name in os.listdir(root):
            path = os.path.join(root, name)
            if checkpoint_step(name) is not None and path not in complete:
                shutil.rmtree(path, ignore_errors=True)
        for path in complete[: -self.keep_checkpoints]:
            shutil.rmtree(path, ignore_errors=True)


class TensorftSFTTrainer(AdapterTrainerMixin, SFTTrainer):
    pass


class TensorftDPOTrainer(AdapterTrainerMixin, DPOTrainer):
    """DPO whose reference is the policy with its adapters switched off (no second model)."""

    def compute_ref_log_probs(self, model, inputs):
        with disable_adapters(self.model):
            return super().compute_ref_log_probs(model, inputs)


# --------------------------------------------------------------------------- callbacks


def peak_memory_mb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


class MetricsCallback(TrainerCallback):
    """Appends step, loss, learning rate, tokens/s and peak memory to ``metrics.jsonl``."""

    def __init__(self, path: str):
        self.path = path
        self._last = None  # (time, tokens seen)

    def on_train_begin(self, args, state, control, **kwargs):
        self._last = (time.perf_counter(), state.num_input_tokens_seen)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is None or "loss" not in logs:
            return
        now, tokens = time.perf_counter(), state.num_input_tokens_seen
        then, before = self._last or (now, tokens)
        self._last = (now, tokens)
        logs["tokens_per_s"] = round((tokens - before) / max(now - then, 1e-9), 1)
        if not state.is_world_process_zero:
            return
        row = {
            "step": state.global_step,
            "loss": logs["loss"],
            "learning_rate": logs.get("learning_rate"),
            "tokens_per_s": logs["tokens_per_s"],
            "peak_memory_mb": round(peak_memory_mb(), 1),
        }
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")


class RunInfoCallback(TrainerCallback):
    """Writes ``run_info.json`` once training starts (after DeepSpeed or FSDP has partitioned
    the model): the Trainer's world size, the process group's size and backend, and how much
    of the adapter and of the base this rank holds. Tests and users check it, because several
    launch paths fall back to one process or to full replicas without a word."""

    def __init__(self, path: str, strategy: str):
        self.path, self.strategy = path, strategy

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        import torch.distributed as dist

        from .distributed import sharding_report

        info = {
            "strategy": self.strategy,
            "world_size": args.world_size,
            "process_group": dist.get_world_size() if dist.is_initialized() else 1,
            "backend": dist.get_backend() if dist.is_initialized() else None,
            **sharding_report(model),
        }
        if state.is_world_process_zero:
            write_json(self.path, info)


class CheckpointOnSignal(TrainerCallback):
    """SIGTERM / SIGUSR1 (SLURM preemption): save a checkpoint at the end of the current step,
    then stop. The launcher exits non-zero so a requeued job resumes from that checkpoint."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self):
        self.received: int | None = None
        for sig in self.SIGNALS:
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        self.received = signum

    def on_step_end(self, args, state, control, **kwargs):
        if self.received is not None:
            control.should_save = True
            control.should_training_stop = True
        return control
