"""Trainers composed from trl: adapter-only checkpoints that are atomic, DPO's reference as the
same model with its adapters switched off, metrics, and checkpoint-on-signal.

trl's SFTTrainer and DPOTrainer do the training loop; the mixin below changes what a
checkpoint holds (the adapter, not the base weights; gathered when sharded; the optimizer of a
self-sharded FSDP2 model) and how one is marked complete, and lets a quantized base with a
tensorft adapter past transformers' "purely quantized model" check.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import shutil
import signal
import time

import torch
import torch.nn.functional as F
from transformers import TrainerCallback
from transformers.trainer_pt_utils import nested_gather
from trl import DPOTrainer, SFTTrainer

from .distributed import full_adapter_state, is_fsdp2
from .model import collect_aux_losses, disable_adapters, unwrap
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


class TaskIdsCollator:
    """trl's collators build the batch from the keys they know, so a row's ``task_ids`` is taken
    off first and put back as a ``(batch,)`` long tensor, which the model's forward takes
    (``model(..., task_ids=ids)``). ``copies``: DPO's batch holds the rows twice, chosen then
    rejected, and each copy keeps its row's task."""

    def __init__(self, inner, copies: int = 1):
        self.inner, self.copies = inner, copies

    def __call__(self, features):
        if not features or "task_ids" not in features[0]:
            return self.inner(features)
        ids = torch.tensor([f["task_ids"] for f in features], dtype=torch.long)
        batch = self.inner([{k: v for k, v in f.items() if k != "task_ids"} for f in features])
        batch["task_ids"] = ids.repeat(self.copies)
        return batch

    def __getattr__(self, name):  # the wrapped collator's settings (pad_token_id, ...)
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)


@contextlib.contextmanager
def first_output(model, enabled: bool = True):
    """The model's first forward output in the block (a list: empty if none), so per-row
    losses come from the forward the trainer already runs."""
    found = []
    if not enabled:
        yield found
        return

    def keep(module, args, output):
        if not found:
            found.append(output)

    handle = unwrap(model).register_forward_hook(keep)
    try:
        yield found
    finally:
        handle.remove()


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

    def create_optimizer(self, model=None):
        # The Trainer's optimizer class and arguments, but tensorft's parameter groups: each
        # kind's learning-rate scales (tensorft/optim.py) on top of ``train.lr``.
        if self.optimizer is None:
            from .optim import optimizer_groups

            optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, self.model)
            groups = optimizer_groups(self.model, self.args.learning_rate, self.args.weight_decay)
            self.optimizer = optimizer_cls(groups, **optimizer_kwargs)
        return self.optimizer

    task_names: list[str] = []  # multi-task: logged per task as loss/<name>
    rows_per_example = 1  # rows of the model's batch per data row (DPO: chosen and rejected)

    # The Trainer sets its collator (trl's) here, and every data loader reads it, DPO's
    # reference pass included: wrap it so task ids survive collation.
    @property
    def data_collator(self):
        return self.__dict__.get("_task_ids_collator")

    @data_collator.setter
    def data_collator(self, collator):
        if collator is not None and not isinstance(collator, TaskIdsCollator):
            collator = TaskIdsCollator(collator, self.rows_per_example)
        self.__dict__["_task_ids_collator"] = collator

    def _set_signature_columns_if_needed(self):
        # remove_unused_columns keeps only the columns trl knows: task ids too.
        super()._set_signature_columns_if_needed()
        if "task_ids" not in self._signature_columns:
            self._signature_columns = [*self._signature_columns, "task_ids"]

    # Auxiliary losses (router cross-entropy, load balancing) that routed kinds add during the
    # forward (``state.add_aux_loss``) join the loss here, for SFT and DPO alike, and are
    # logged as ``aux/<name>``, averaged over the logging window like the loss. Multi-task
    # runs also log each task's loss, ``loss/<task>``, from the same forward's outputs.

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        per_task = bool(model.training and self.task_names and "task_ids" in inputs)
        with collect_aux_losses(model) as aux, first_output(model, per_task) as outputs_seen:
            result = super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
        if outputs_seen:
            self._record_task_losses(inputs, outputs_seen[0])
        if not aux:
            return result
        loss, outputs = result if return_outputs else (result, None)
        # The Trainer divides the loss by the accumulation steps unless it is already normalized
        # over the whole accumulated batch; the aux losses are per-micro-batch means, so they
        # take that division themselves in the second case (see Trainer.training_step).
        scale = 1.0
        if model.training and self._loss_scaled_for_ga(num_items_in_batch):
            scale = 1.0 / self.current_gradient_accumulation_steps
        loss = loss + scale * sum(value.to(loss.device) for value in aux.values())
        if model.training:
            sums = self.__dict__.setdefault("_aux_window", {})
            for name, value in aux.items():
                total, count = sums.get(name, (0.0, 0))
                sums[name] = (total + value.detach().float(), count + 1)
        return (loss, outputs) if return_outputs else loss

    def _loss_scaled_for_ga(self, num_items_in_batch) -> bool:
        if self.loss_is_scaled_for_ga is not None:
            return self.loss_is_scaled_for_ga
        return (self.model_accepts_loss_kwargs and num_items_in_batch is not None) or self.compute_loss_func is not None

    def row_losses(self, inputs, outputs) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Per data row: (loss total, weight), so a task's loss is sum(total) / sum(weight)."""
        raise NotImplementedError

    def _record_task_losses(self, inputs, outputs) -> None:
        rows = self.row_losses(inputs, outputs)
        if rows is None:
            return
        totals, weights = (x.detach().float() for x in rows)
        ids = inputs["task_ids"][: totals.shape[0]].to(totals.device)  # DPO: the chosen copies come first
        window = self.__dict__.get("_task_window")
        if window is None:
            window = (totals.new_zeros(len(self.task_names)), totals.new_zeros(len(self.task_names)))
        self._task_window = (window[0].index_add(0, ids, totals), window[1].index_add(0, ids, weights))

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        if "loss" in logs:  # a training log: the windows' means, over all ranks
            logs.update(self._pop_aux_means())
            logs.update(self._pop_task_means())
        super().log(logs, *args, **kwargs)

    def _pop_aux_means(self) -> dict[str, float]:
        window = self.__dict__.pop("_aux_window", {})  # the mean per micro-batch
        gather = lambda x: nested_gather(x, self.args.parallel_mode)  # noqa: E731
        return {f"aux/{name}": round(gather(total / count).mean().item(), 6) for name, (total, count) in window.items()}

    def _pop_task_means(self) -> dict[str, float]:
        window = self.__dict__.pop("_task_window", None)
        if window is None:
            return {}
        n = len(self.task_names)
        totals, weights = (nested_gather(x, self.args.parallel_mode).reshape(-1, n).sum(0) for x in window)
        return {
            f"loss/{name}": round((totals[i] / weights[i]).item(), 6)
            for i, name in enumerate(self.task_names)
            if weights[i] > 0
        }

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
    def row_losses(self, inputs, outputs):
        # trl's fused head: per-token log-probs, zero off the labels; token-weighted like the loss
        mask = outputs.label_mask
        return -(outputs.log_probs * mask).sum(1), mask.sum(1)


class TensorftDPOTrainer(AdapterTrainerMixin, DPOTrainer):
    """DPO whose reference is the policy with its adapters switched off (no second model)."""

    rows_per_example = 2

    def row_losses(self, inputs, outputs):
        # Each pair's loss, for trl's default DPO loss (sigmoid) with precomputed reference log-probs.
        if "ref_chosen_logps" not in inputs or list(self.loss_types) != ["sigmoid"] or self.ld_alpha is not None:
            return None
        length = inputs["completion_mask"].shape[1] - 1
        chosen, rejected = outputs.log_probs[:, -length:].sum(1).chunk(2)
        margin = (chosen - inputs["ref_chosen_logps"]) - (rejected - inputs["ref_rejected_logps"])
        losses = -F.logsigmoid(self.beta * margin)
        return losses, torch.ones_like(losses)

    def compute_ref_log_probs(self, model, inputs):
        with disable_adapters(self.model):
            return super().compute_ref_log_probs(model, inputs)


# --------------------------------------------------------------------------- callbacks


def peak_memory_mb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


class MetricsCallback(TrainerCallback):
    """Appends step, loss, learning rate, tokens/s, peak memory, the routed kinds' auxiliary
    losses (``aux/<name>``) and a multi-task run's per-task losses (``loss/<task>``) to
    ``metrics.jsonl``."""

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
            **{key: value for key, value in logs.items() if key.startswith(("aux/", "loss/"))},
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
