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
import sys
import time

import torch
import torch.nn.functional as F
from datasets import Dataset
from transformers import Trainer, TrainerCallback
from transformers.trainer_pt_utils import nested_gather
from trl import DPOTrainer, SFTTrainer

from .distributed import full_adapter_state, is_fsdp2
from .errors import TensorftError
from .model import collect_aux_losses, disable_adapters, root_of, unwrap
from .saving import atomic_file, fsync_tree, load_adapter_weights, save, write_json, write_text

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
    rejected, and each copy keeps its row's task. T-REX's per-row ``intuition`` scores (a list
    of K floats) travel the same way, as a ``(batch, K)`` float tensor."""

    ROW_INPUTS = {"task_ids": torch.long, "intuition": torch.float32}  # per-row routing inputs

    def __init__(self, inner, copies: int = 1):
        self.inner, self.copies = inner, copies

    def __call__(self, features):
        keys = [k for k in self.ROW_INPUTS if features and k in features[0]]
        if not keys:
            return self.inner(features)
        rows = {k: torch.tensor([f[k] for f in features], dtype=self.ROW_INPUTS[k]) for k in keys}
        batch = self.inner([{k: v for k, v in f.items() if k not in rows} for f in features])
        for k, value in rows.items():
            batch[k] = torch.cat([value] * self.copies)
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
        # trl casts every trainable parameter of a quantized model to bf16 (QLoRA's setting for
        # PEFT); tensorft keeps adapters in float32 (an update smaller than a bf16 step of a
        # factor would be lost, e.g. CP's order-one C factors): the values from before come back.
        kept = {name: p.data for name, p in model.named_parameters() if p.requires_grad} if flagged else {}
        try:
            super().__init__(*args, model=model, **kwargs)
        finally:
            if flagged:
                model._hf_peft_config_loaded = False
        for name, p in model.named_parameters() if kept else ():
            if name in kept and p.dtype != kept[name].dtype:
                p.data = kept[name]

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
    choice_sets: list = []  # multiple-choice eval sets, scored by rank classification (choice_eval.py)
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
        # remove_unused_columns keeps only the columns trl knows: the per-row routing inputs too.
        super()._set_signature_columns_if_needed()
        extra = [k for k in TaskIdsCollator.ROW_INPUTS if k not in self._signature_columns]
        self._signature_columns = [*self._signature_columns, *extra]

    # Auxiliary losses (router cross-entropy, load balancing) that routed kinds add during the
    # forward (``state.add_aux_loss``) join the loss here, for SFT and DPO alike, and are
    # logged as ``aux/<name>``, averaged over the logging window like the loss. Multi-task
    # runs also log each task's loss, ``loss/<task>``, from the same forward's outputs.

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        # ttmoe stage 2: the step's forward is a base pass (frozen experts, one-hot gates), so its
        # LM loss trains nothing; the router's aux loss is the whole objective
        router_only = model.training and getattr(root_of(model).kind, "router_only_training", False)
        per_task = bool(model.training and self.task_names and "task_ids" in inputs and not router_only)
        with collect_aux_losses(model) as aux, first_output(model, per_task) as outputs_seen:
            result = super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
        if outputs_seen:
            self._record_task_losses(inputs, outputs_seen[0])
        if not aux:
            return result
        loss, outputs = result if return_outputs else (result, None)
        if router_only:
            loss = torch.zeros_like(loss)
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

    def create_model_card(self, *args, **kwargs) -> None:
        # trl writes a README.md model card into checkpoints/ at every save, built from PEFT's
        # config, so it names the base model "None"; a tensorft adapter's adapter_config.json
        # names its base and kind.
        return None

    # The eval loss. The Trainer combines ranks by repeating each rank's batch loss over the
    # configured batch size, gathering, and cutting the result to the last batch's real rows:
    # on the last (or only) batch of a set that does not fill every rank, the cut keeps the
    # first rank's copies and drops the others' (with 4 rows on 2 ranks, rank 0's loss alone,
    # and for a loss scaled by the number of ranks, 2x it). The loss here is the data set's:
    # each row's loss total and weight (``row_losses``: tokens for SFT, one per row for
    # classification and DPO), gathered row by row like the predictions (the padding rows a
    # rank repeats are cut) and summed: the same on any number of ranks and for any batching.

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        rows = self.__dict__.get("_eval_rows")
        if rows is None:
            return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys)
        inputs = self._prepare_inputs(inputs)  # on the device, as the row losses need them
        with first_output(model) as outputs_seen:
            result = super().prediction_step(model, inputs, prediction_loss_only, ignore_keys)
        try:
            found = self.row_losses(inputs, outputs_seen[0]) if outputs_seen and result[0] is not None else None
        except (AttributeError, KeyError):  # an output without the per-row terms (e.g. trl without its fused head)
            found = None
        if found is None:  # the same on every rank (the objective's settings): no gather is skipped by one
            rows.append(None)
            return result
        gathered = []
        for x in found:
            x = self.accelerator.pad_across_processes(x.detach().float().reshape(-1), dim=0, pad_index=0)
            gathered.append(self.accelerator.gather_for_metrics(x).double().sum().cpu())
        rows.append(tuple(gathered))
        return result

    def evaluation_loop(self, dataloader, description, prediction_loss_only=None, ignore_keys=None,
                        metric_key_prefix: str = "eval"):
        self._eval_rows = []
        try:
            output = super().evaluation_loop(dataloader, description, prediction_loss_only, ignore_keys, metric_key_prefix)
        finally:
            rows, self._eval_rows = self._eval_rows, None
        key = f"{metric_key_prefix}_loss"
        if rows and None not in rows and key in output.metrics:
            total, weight = (sum(r[i] for r in rows) for i in (0, 1))
            if weight > 0:
                output.metrics[key] = (total / weight).item()
        return output

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval"):
        # The eval loss as the Trainer computes it (per task for a dict of sets), then, on the
        # top-level call, the held-out accuracy of the multiple-choice sets.
        metrics = super().evaluate(eval_dataset, ignore_keys, metric_key_prefix)
        if eval_dataset is None and metric_key_prefix == "eval" and self.choice_sets:
            metrics.update(self.evaluate_choices())
        return metrics

    def evaluate_choices(self) -> dict[str, float]:
        """Rank-classification accuracy of every multiple-choice set (every rank runs it: a
        sharded model needs all of them), logged to metrics.jsonl and TensorBoard."""
        from .choice_eval import evaluate_choices

        done = self.__dict__.get("_choices_scored")
        if done and done[0] == self.state.global_step:  # the last evaluation was at this step
            return dict(done[1])
        metrics = evaluate_choices(
            self.model, self.processing_class, self.choice_sets, self.args.per_device_eval_batch_size, self.args.device
        )
        self._choices_scored = (self.state.global_step, metrics)
        self.log(dict(metrics))
        return metrics

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        # Every rank gathers (sharded adapters: FSDP2, ZeRO-3), rank 0 writes. Only the adapter:
        # the Trainer's own save would consolidate the whole base model under ZeRO-3.
        # ZeRO-3: an evaluation forward can end with parameters still being prefetched (in
        # flight) for the next forward, which cannot be gathered; a kind's model-level step (the
        # ttmoe router's base pass, run before DeepSpeed's start-of-forward hook) makes its
        # trace predict one. Settle and release them first (no-op under ZeRO-2 and DDP).
        getattr(self.model_wrapped, "empty_partition_cache", lambda: None)()
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
        fsync_tree(folder)  # each rank flushes what it wrote (the Trainer's and DeepSpeed's files too)
        self.accelerator.wait_for_everyone()  # every rank's files are on disk before COMPLETE
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

    # DeepSpeed writes its engine's whole module into every checkpoint; with a frozen base that
    # is the base model itself (GBs for a 7B base, and seconds of a preemption's grace period;
    # transformers leaves frozen weights out for PEFT models only). tensorft's leave them out:
    # on resume the base is already loaded, so their absence from the checkpoint is expected.

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        if not self.is_deepspeed_enabled:
            return super()._save_optimizer_and_scheduler(output_dir)
        from accelerate.utils import DeepSpeedSchedulerWrapper

        # exclude_frozen_parameters misses a tied alias (lm_head.weight of a tied embedding)
        hook = unwrap(self.model).register_state_dict_post_hook(_drop_frozen)
        try:
            self.model_wrapped.save_checkpoint(output_dir, exclude_frozen_parameters=True)
        finally:
            hook.remove()
        if self.args.should_save and not isinstance(self.lr_scheduler, DeepSpeedSchedulerWrapper):
            torch.save(self.lr_scheduler.state_dict(), os.path.join(output_dir, SCHEDULER_FILE))

    def train(self, *args, **kwargs):
        hook = None
        if self.is_deepspeed_enabled:  # DeepSpeed loads its checkpoint's module strictly
            hook = unwrap(self.model).register_load_state_dict_post_hook(_frozen_keys_may_be_missing)
        try:
            return super().train(*args, **kwargs)
        finally:
            if hook is not None:
                hook.remove()

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


def _frozen_names(module: torch.nn.Module) -> set[str]:
    return {name for name, p in module.named_parameters(remove_duplicate=False) if not p.requires_grad}


def _drop_frozen(module: torch.nn.Module, state_dict, prefix: str, local_metadata) -> None:
    """state_dict post-hook: the frozen parameters (tied aliases included) are left out."""
    for name in _frozen_names(module):
        state_dict.pop(prefix + name, None)


def _frozen_keys_may_be_missing(module: torch.nn.Module, incompatible) -> None:
    """load_state_dict post-hook: a checkpoint without the frozen base loads strictly."""
    frozen = _frozen_names(module)
    incompatible.missing_keys[:] = [key for key in incompatible.missing_keys if key not in frozen]


def check_lengths(trainer, name: str, rows: int, truncated: int, dropped: int, max_length: int) -> None:
    """Keep what the trainer's ``max_length`` did to a data set (``length_report``, printed by the
    launcher); a set left with no row is refused (trl would fail later, in its sampler)."""
    trainer.__dict__.setdefault("length_report", {})[name] = (rows, truncated, dropped)
    if rows and dropped == rows:
        key = "data.train" if name == "train" else f"data.eval ({name})" if name != "eval" else "data.eval"
        raise TensorftError(
            f"train.max_length: {max_length}: no row of {key} fits; in all {rows} rows the prompt alone reaches the "
            "limit, leaving nothing to learn; raise train.max_length or shorten the prompts"
        )


class TensorftSFTTrainer(AdapterTrainerMixin, SFTTrainer):
    def _prepare_dataset(self, dataset, processing_class, args, packing, formatting_func, dataset_name):
        # trl truncates rows at max_length and drops those left without a label: count both from the
        # rows' full lengths (tokenized by trl itself, untruncated and unshuffled; datasets caches it)
        if args.max_length is not None and isinstance(dataset, Dataset):
            limit, shuffle = args.max_length, args.shuffle_dataset
            args.max_length, args.shuffle_dataset = None, False
            try:
                full = super()._prepare_dataset(dataset, processing_class, args, False, formatting_func, dataset_name)
            finally:
                args.max_length, args.shuffle_dataset = limit, shuffle
            if "labels" in full.column_names:
                keep = slice(None, limit) if args.truncation_mode == "keep_start" else slice(-limit, None)
                labels = full["labels"]
                truncated = sum(len(row) > limit for row in labels)
                # packing splits nothing off and drops nothing (bfd truncates long rows)
                dropped = 0 if packing else sum(all(t == -100 for t in row[keep]) for row in labels)
                check_lengths(self, dataset_name, len(labels), truncated, dropped, limit)
        return super()._prepare_dataset(dataset, processing_class, args, packing, formatting_func, dataset_name)

    def row_losses(self, inputs, outputs):
        # trl's fused head: per-token log-probs, zero off the labels; token-weighted like the loss
        mask = outputs.label_mask
        return -(outputs.log_probs * mask).sum(1), mask.sum(1)


class TensorftDPOTrainer(AdapterTrainerMixin, DPOTrainer):
    """DPO whose reference is the policy with its adapters switched off (no second model)."""

    rows_per_example = 2

    def __init__(self, *args, defer_reference: bool = False, **kwargs):
        # trl computes the reference log-probs in its constructor. Under FSDP2 tensorft shards
        # the model only after that (trl hashes the model's plain tensors there), so the pass
        # would run on the unsharded model, off the device: deferred until after sharding.
        self._deferred_reference = [] if defer_reference else None
        super().__init__(*args, **kwargs)

    def _precompute_ref_logps(self, dataset, name, batch_size):
        if self._deferred_reference is not None:
            self._deferred_reference.append((name, batch_size))
            return dataset
        return super()._precompute_ref_logps(dataset, name, batch_size)

    def precompute_reference(self) -> None:
        """Run the reference passes deferred by ``defer_reference`` (on the model as it is now)."""
        pending, self._deferred_reference = self._deferred_reference or [], None
        for name, batch_size in pending:
            if name == "train":
                self.train_dataset = self._precompute_ref_logps(self.train_dataset, name, batch_size)
            elif isinstance(self.eval_dataset, dict):
                self.eval_dataset[name] = self._precompute_ref_logps(self.eval_dataset[name], name, batch_size)
            else:
                self.eval_dataset = self._precompute_ref_logps(self.eval_dataset, name, batch_size)

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        prepared = super()._prepare_dataset(dataset, processing_class, args, dataset_name)
        limit = args.max_length
        if limit is not None and isinstance(dataset, Dataset) and "prompt_ids" in prepared.column_names:
            # trl drops pairs whose prompt alone fills max_length and truncates the rest in its collator
            kept = len(prepared)
            longer = sum(len(p) + max(len(c), len(r)) > limit for p, c, r in
                         zip(prepared["prompt_ids"], prepared["chosen_ids"], prepared["rejected_ids"]))
            check_lengths(self, dataset_name, len(dataset), longer + len(dataset) - kept, len(dataset) - kept, limit)
        return prepared

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


class TensorftClassificationTrainer(AdapterTrainerMixin, Trainer):
    """Sequence classification (``model.task: seq-cls``, classification rows): the model's own
    cross-entropy on its head; evaluation also reports accuracy (``eval_<task>_accuracy``)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("compute_metrics", classification_accuracy)
        super().__init__(*args, **kwargs)
        # The Trainer takes a model whose forward has ``**kwargs`` for one that divides its loss
        # by ``num_items_in_batch`` (the labels of every rank and accumulation step): it then
        # multiplies the loss by the number of ranks (DDP averages it back) and leaves out the
        # division by the accumulation steps. The classification head's loss ignores that count
        # (transformers' sequence-classification models do not pass it on): a mean over the
        # micro-batch's rows, which the scaling made world_size x grad_accum times too large (the
        # logged loss, the eval loss, and the gradient). A per-batch mean, as the Trainer treats
        # a model without loss kwargs.
        self.model_accepts_loss_kwargs = False

    def row_losses(self, inputs, outputs):
        if outputs.logits.shape[-1] < 2 or inputs["labels"].is_floating_point():
            return None  # regression or multi-label: not the cross-entropy below
        logits = outputs.logits.float()
        losses = F.cross_entropy(logits, inputs["labels"].to(logits.device), reduction="none")
        return losses, torch.ones_like(losses)


def classification_accuracy(prediction) -> dict[str, float]:
    logits = prediction.predictions[0] if isinstance(prediction.predictions, tuple) else prediction.predictions
    return {"accuracy": float((logits.argmax(-1) == prediction.label_ids).mean())}


def tokenize_classification(tokenizer, max_length: int, train, evaluation):
    """Classification rows (text, label) as the model's inputs (input_ids, attention_mask,
    labels); per-row task ids stay."""

    def tokenize(ds):
        ds = ds.map(lambda b: tokenizer(b["text"], truncation=True, max_length=max_length), batched=True)
        return ds.remove_columns("text").rename_column("label", "labels")

    evaluation = {name: tokenize(ds) for name, ds in evaluation.items()} if isinstance(evaluation, dict) else (
        evaluation and tokenize(evaluation))
    return tokenize(train), evaluation


# --------------------------------------------------------------------------- callbacks


def peak_memory_mb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def router_health(model) -> tuple[dict[str, float], dict]:
    """A routed kind's router statistics since the last log (T-REX: per-layer expert usage and
    its entropy): (scalars for the logs, per-layer usage vectors for metrics.jsonl only)."""
    if model is None or not hasattr(unwrap(model), "tensorft"):
        return {}, {}
    watch = getattr(root_of(model).kind, "router_health", None)
    return watch(unwrap(model)) if watch is not None else ({}, {})


class MetricsCallback(TrainerCallback):
    """Appends step, loss, learning rate, tokens/s, peak memory, the routed kinds' auxiliary
    losses (``aux/<name>``), a multi-task run's per-task losses (``loss/<task>``) and a
    token-routed kind's router health (T-REX: ``router/entropy/<layer>``, ``router/usage``) to
    ``metrics.jsonl``."""

    def __init__(self, path: str):
        self.path = path
        self._last = None  # (time, tokens seen)

    def on_train_begin(self, args, state, control, **kwargs):
        self._last = (time.perf_counter(), state.num_input_tokens_seen)
        if state.global_step and state.is_world_process_zero and os.path.isfile(self.path):
            # resumed: the steps after the checkpoint are logged again by this run (and a line
            # cut short by the kill is dropped)
            with open(self.path, encoding="utf-8") as f:
                kept = [line for line in f if _logged_step(line) is not None and _logged_step(line) <= state.global_step]
            write_text(self.path, "".join(kept))

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is None:
            return
        if "loss" not in logs:  # an evaluation: eval_loss (per task) and held-out accuracies
            evaluation = {key: value for key, value in logs.items() if key.startswith("eval_")}
            if evaluation and state.is_world_process_zero:
                with open(self.path, "a", encoding="utf-8") as f:
                    f.write(json.dumps({"step": state.global_step, **evaluation}) + "\n")
            return
        now, tokens = time.perf_counter(), state.num_input_tokens_seen
        then, before = self._last or (now, tokens)
        self._last = (now, tokens)
        logs["tokens_per_s"] = round((tokens - before) / max(now - then, 1e-9), 1)
        health, vectors = router_health(kwargs.get("model"))  # every rank: summed over ranks
        logs.update(health)  # scalars: TensorBoard's callback, called after this one, logs them too
        if not state.is_world_process_zero:
            return
        row = {
            "step": state.global_step,
            "loss": logs["loss"],
            "learning_rate": logs.get("learning_rate"),
            "tokens_per_s": logs["tokens_per_s"],
            "peak_memory_mb": round(peak_memory_mb(), 1),
            **{key: value for key, value in logs.items() if key.startswith(("aux/", "loss/", "router/"))},
            **vectors,
        }
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")


def _logged_step(line: str) -> int | None:
    try:
        return json.loads(line).get("step", 0)
    except (json.JSONDecodeError, AttributeError):
        return None


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
    """SIGTERM / SIGUSR1 (SLURM preemption) and Ctrl-C (SIGINT): save a checkpoint at the end of
    the current step, then stop. The launcher exits non-zero (128 + signal) so a requeued job
    resumes from that checkpoint. A second Ctrl-C stops at once (KeyboardInterrupt, no checkpoint).
    The previous handlers come back when training ends. A signal ignored when training starts
    stays ignored (a job started in the background with ``&`` ignores Ctrl-C, as Python does)."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)

    def __init__(self):
        self.received: int | None = None
        self._previous = {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS
                          if signal.getsignal(sig) is not signal.SIG_IGN}

    def _handle(self, signum, frame):
        if signum == signal.SIGINT and self.received is not None:
            raise KeyboardInterrupt  # asked twice: do not wait for the step and the checkpoint
        self.received = signum
        if signum == signal.SIGINT:
            print("\ntensorft: Ctrl-C: writing a checkpoint after this step (Ctrl-C again to stop at once)",
                  file=sys.stderr, flush=True)

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)

    def on_train_end(self, args, state, control, **kwargs):
        self.restore()

    def on_step_end(self, args, state, control, **kwargs):
        if self.agreed() is not None:
            control.should_save = True
            control.should_training_stop = True
        return control

    def agreed(self) -> int | None:
        """The signal any rank received, known to every rank at the same step boundary.

        A signal may reach one rank only (``kill`` of one process, a node's own preemption), or
        reach ranks on different sides of a step boundary; a rank that checkpoints alone then
        waits forever in the checkpoint's collectives while the others wait in the next step's.
        So the ranks agree at every step end: one all-reduce (max) of a single integer."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return self.received
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
        flag = torch.tensor([self.received or 0], dtype=torch.int64, device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.item() and self.received is None:
            self.received = int(flag.item())
        return self.received
