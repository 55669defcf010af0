"""The training loop behind `python -m gradq_fx train` and `gradq_fx.train.train(config)`.

One epoch: every process trains on its shard of the training set (DistributedSampler, the
same order for a given seed and epoch), with a progress line every `--log-every` steps on
stderr; then the test set is evaluated (top-1 and cross-entropy, each process a shard, summed
across processes). Rank 0 then writes, in the output directory:
- log.csv: one row per epoch (LOG_FIELDS). train_loss is the mean training objective of the
  epoch (ch_loss for gradq, cross-entropy otherwise), test_loss the test cross-entropy,
  test_top1 in percent, lr the learning rate of the epoch's last step, seconds the epoch's
  wall time (training and evaluation); with --lsq also `oscillation`, the epoch's mean
  fraction of LSQ weight codes that changed per step (`qat.OscillationTracker`, averaged
  over the quantized weights);
- curves.png: loss and accuracy per epoch;
- checkpoint.pt: see `gradq_fx.train.checkpoint`; `--resume` continues from it;
- result.json: the final top-1 and what produced it, once the last epoch is done.

The model trains at its precision (`gradq_fx.train.settings`): the INT8 precisions compile the
model (not its DDP wrapper) with gradq's backend, and DDP wraps the compiled module, so each
process runs the whole gradq-rewritten forward and backward graph and DDP averages the
gradients it produces. Evaluation calls the compiled module directly (in eval mode, under
no_grad: gradq's inference graph, forward GEMMs in INT8).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import hashlib
import json
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, DistributedSampler, Subset

from gradq_fx import qat, stats
from gradq_fx.config import GradQConfig
from gradq_fx.losses import kd_loss
from gradq_fx.train import checkpoint
from gradq_fx.train.data import BatchTransform, load_datasets
from gradq_fx.train.distributed import Distributed
from gradq_fx.train.model import compile_for, create_model, default_backend, describe
from gradq_fx.train.plot import draw_curves
from gradq_fx.train.schedule import build_optimizer, build_scheduler
from gradq_fx.train.settings import TrainConfig, flag

LOG_FIELDS = ("epoch", "step", "train_loss", "test_loss", "test_top1", "lr", "seconds")
QAT_LOG_FIELDS = (*LOG_FIELDS, "oscillation")  # runs with --lsq
FLOAT_PRECISIONS = ("fp32", "bf16")  # what a --teacher checkpoint may have been trained at
LOG_NAME, CURVES_NAME, RESULT_NAME = "log.csv", "curves.png", "result.json"
BACKEND_NOTES = {
    "gradq": "gradq's rewrite, compiled by Inductor",
    "gradq_eager": "gradq's rewrite without Inductor's code generation, quick to start",
}


def train(args_or_config: TrainConfig | argparse.Namespace | Mapping[str, Any]) -> dict | None:
    """Train as configured; return result.json's contents (None when `stop_after` ended the
    run before its last epoch). Raises ValueError, naming the flag, on bad settings."""
    return Trainer(TrainConfig.coerce(args_or_config)).fit()


def note(message: str) -> None:
    """A line of progress on stderr."""
    print(message, file=sys.stderr, flush=True)


def augmentation_seed(seed: int, epoch: int, rank: int) -> int:
    """The seed of one epoch's crops and flips on one process: a function of nothing else."""
    digest = hashlib.sha256(f"augment/{seed}/{epoch}/{rank}".encode()).digest()
    return int.from_bytes(digest[:8], "little")


def loss_function(config: TrainConfig):
    """logits, targets -> scalar loss: ch_loss for gradq (unless --no-ch-loss), else CE."""
    if config.uses_ch_loss:
        from gradq_fx.losses import ch_loss

        return ch_loss
    return F.cross_entropy


class Trainer:
    """Sets up a run from a TrainConfig (raising ValueError on bad input before any training);
    `fit()` trains it."""

    def __init__(self, config: TrainConfig):
        self.config = config
        self.dist = Distributed.setup(config.device, config.dist_timeout)
        try:
            self._setup()
        except BaseException:
            self.dist.close()
            raise

    def _setup(self) -> None:
        self._build_data()
        self._build_model()
        self._build_teacher()
        self._build_optimizer()
        self.epoch = 0  # epochs completed
        self.step = 0  # optimiser steps taken
        self.history: list[dict[str, float]] = []
        self.rewritten_ops: int | None = None  # by gradq, in the graphs of the first step
        self.last_lr = self.optimizer.param_groups[0]["lr"]  # of the latest step
        if self.config.resume:
            self._restore(checkpoint.load(self.config.out_dir / checkpoint.CHECKPOINT_NAME))

    def _build_data(self) -> None:
        """Datasets, the batch transform, and each process's loaders (training: its shard in
        a (seed, epoch) order, whole batches only; test: every world_size-th image)."""
        c, dist = self.config, self.dist
        self.data = load_datasets(c.data_dir, c.img_size, c.train_subset, c.test_subset)
        per_process = len(self.data.train) // dist.world_size
        if per_process < c.batch_size:
            raise ValueError(
                f"--batch-size: {c.batch_size} images per step and process, but only "
                f"{per_process} training images per process (see --train-subset)"
            )
        self.transform = BatchTransform(self.data.mean, self.data.std, c.augment)
        self.sampler = DistributedSampler(
            self.data.train, dist.world_size, dist.rank, shuffle=True, seed=c.seed, drop_last=True
        )
        loader_options = dict(
            batch_size=c.batch_size,
            num_workers=c.workers,
            pin_memory=dist.device.type == "cuda",
            persistent_workers=c.workers > 0,
        )
        self.train_loader = DataLoader(
            self.data.train, sampler=self.sampler, drop_last=True, **loader_options
        )
        test_shard = Subset(self.data.test, range(dist.rank, len(self.data.test), dist.world_size))
        self.test_loader = DataLoader(test_shard, shuffle=False, **loader_options)
        self.steps_per_epoch = len(self.train_loader)

    def _build_model(self) -> None:
        """The model (same initial weights on every process), compiled for the precision,
        wrapped in DDP when there are several processes; the loss."""
        c, dist = self.config, self.dist
        torch.manual_seed(c.seed)
        self.model = create_model(
            c.model, self.data.num_classes, c.img_size, c.patch_size, c.depth
        ).to(dist.device)
        self.trackers: dict[str, qat.OscillationTracker] = {}
        if c.lsq:
            self._attach_lsq()
        self.backend = (c.backend or default_backend(dist.device)) if c.int8 else None
        self.net, self.gradq = compile_for(self.model, c.gradq_options(), self.backend, c.compile)
        self.train_net = dist.wrap(self.net)
        self.loss_fn = loss_function(c)
        torch.manual_seed(c.seed + dist.rank)  # dropout, stochastic rounding: per process

    def _attach_lsq(self) -> None:
        """LSQ quantizers on the model's Linears, input step sizes from one batch (the first
        images of the training set, unaugmented: the same on every process), and one
        oscillation tracker per quantized weight."""
        c, device = self.config, self.dist.device
        self.lsq_layers = qat.attach_lsq(self.model, c.lsq_config())
        if not self.lsq_layers:
            raise ValueError(f"--lsq: {c.model} has no nn.Linear the gradq options select")
        images = torch.stack([self.data.train[i][0] for i in range(c.batch_size)])
        qat.initialise_lsq(self.model, self.transform(images).to(device))
        self.trackers = {
            name: qat.OscillationTracker(weight.shape).to(device)
            for name, weight, _ in qat.quantized_weights(self.model)
        }

    def _build_teacher(self) -> None:
        """The frozen float teacher of --teacher, or None."""
        c, device = self.config, self.dist.device
        self.teacher = None
        if c.teacher is None:
            return
        state = checkpoint.load(Path(c.teacher), flag="--teacher")
        saved = TrainConfig.coerce(state["config"])
        if saved.precision not in FLOAT_PRECISIONS or saved.lsq:
            raise ValueError(
                f"--teacher: {c.teacher} was trained at --precision {saved.precision}"
                f"{' with --lsq' if saved.lsq else ''}; a teacher is a float model "
                f"({' or '.join(FLOAT_PRECISIONS)}, without --lsq)"
            )
        if saved.img_size != c.img_size:
            raise ValueError(
                f"--teacher: {c.teacher} takes {saved.img_size} px images, this run "
                f"--img-size {c.img_size}"
            )
        teacher = create_model(
            saved.model, self.data.num_classes, saved.img_size, saved.patch_size, saved.depth
        )
        try:
            teacher.load_state_dict(state["model"])
        except RuntimeError as error:
            raise ValueError(f"--teacher: {c.teacher} does not fit this data: {error}") from error
        self.teacher = teacher.to(device).eval().requires_grad_(False)

    def _build_optimizer(self) -> None:
        c = self.config
        self.warmup_steps = round(c.warmup_epochs * self.steps_per_epoch)
        self.optimizer = build_optimizer(
            self.model, c.optimizer, c.learning_rate, c.weight_decay, c.uses_adaptive_lr
        )
        # gradq's adaptive learning rate steps the optimizer with per-layer factors.
        self.adaptive = stats.AdaptiveLR(self.optimizer) if c.uses_adaptive_lr else None
        self.scheduler = build_scheduler(
            self.optimizer, self.warmup_steps, self.steps_per_epoch * c.epochs
        )

    # Checkpoints.

    def _state(self) -> dict[str, Any]:
        """What checkpoint.pt holds (module docstring of gradq_fx.train.checkpoint)."""
        options = self.config.gradq_options()
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "epoch": self.epoch,
            "step": self.step,
            "history": self.history,
            "rng": self.dist.all_gather_object(checkpoint.rng_state(self.dist.device)),
            "world_size": self.dist.world_size,
            "config": self.config.to_dict(),
            "gradq_options": None if options is None else self._gradq_config().to_options(),
            # The LSQ step sizes and offsets are in `model`; their widths, and the trackers'
            # last codes (so a resumed run logs the same oscillation), are here.
            "lsq_bits": qat.lsq_bits(self.model),
            "oscillation": {
                name: {"previous": t.previous, "has_previous": t.has_previous}
                for name, t in self.trackers.items()
            },
        }

    def _restore(self, state: dict[str, Any]) -> None:
        where = self.config.out_dir / checkpoint.CHECKPOINT_NAME
        saved = TrainConfig.coerce(state["config"])
        changed = self.config.changes_from(saved)
        if changed:
            differences = ", ".join(
                f"{flag(name)} {getattr(saved, name)!r} (now {getattr(self.config, name)!r})"
                for name in changed
            )
            raise ValueError(f"--resume: {where} was written with other settings: {differences}")
        if state["world_size"] != self.dist.world_size:
            raise ValueError(
                f"--resume: {where} was written by {state['world_size']} process(es), "
                f"this run has {self.dist.world_size}"
            )
        saved_bits = {name: tuple(bits) for name, bits in state.get("lsq_bits", {}).items()}
        if saved_bits != qat.lsq_bits(self.model):
            raise ValueError(
                f"--resume: {where} holds LSQ quantizers of (weight, activation) bits "
                f"{saved_bits or 'none'}, this run {qat.lsq_bits(self.model) or 'none'}"
            )
        self.model.load_state_dict(state["model"])
        for name, saved in state.get("oscillation", {}).items():
            self.trackers[name].previous.copy_(saved["previous"])
            self.trackers[name].has_previous.copy_(saved["has_previous"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.epoch, self.step = state["epoch"], state["step"]
        self.history = [dict(row) for row in state["history"]]
        checkpoint.set_rng_state(state["rng"][self.dist.rank], self.dist.device)

    def _gradq_config(self) -> GradQConfig:
        return GradQConfig.from_options(self.config.gradq_options())

    # Training and evaluation.

    def _autocast(self):
        if self.config.precision == "bf16":
            return torch.autocast(self.dist.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def train_epoch(self, epoch: int) -> float:
        """Train one epoch; return its mean training loss over all processes."""
        c, dist = self.config, self.dist
        self.train_net.train()
        self.sampler.set_epoch(epoch)
        generator = torch.Generator().manual_seed(augmentation_seed(c.seed, epoch, dist.rank))
        epoch_loss = torch.zeros((), dtype=torch.float64, device=dist.device)
        window_loss = torch.zeros((), dtype=torch.float64, device=dist.device)
        window_steps, window_start = 0, time.perf_counter()
        for index, (images, labels) in enumerate(self.train_loader, start=1):
            x = self.transform(images, generator).to(dist.device, non_blocking=True)
            y = labels.to(dist.device, non_blocking=True)
            with self._autocast():
                logits = self.train_net(x)
            loss = self._objective(logits.float(), x, y)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self._optimizer_step()
            self._track_oscillation()
            self.last_lr = self.optimizer.param_groups[0]["lr"]
            self.scheduler.step()
            self.step += 1
            epoch_loss += loss.detach()
            window_loss += loss.detach()
            window_steps += 1
            if self.rewritten_ops is None and self.gradq is not None:
                self._announce_rewrite(time.perf_counter() - window_start)
            if index % c.log_every == 0 or index == self.steps_per_epoch:
                elapsed = time.perf_counter() - window_start
                if dist.is_main:
                    images_per_second = window_steps * c.batch_size * dist.world_size / elapsed
                    note(
                        f"epoch {epoch + 1}/{c.epochs} step {index}/{self.steps_per_epoch}: "
                        f"loss {window_loss.item() / window_steps:.4f} lr {self.last_lr:.3e} "
                        f"{images_per_second:.1f} img/s"
                    )
                window_loss.zero_()
                window_steps, window_start = 0, time.perf_counter()
        total = dist.all_reduce_sum(epoch_loss)
        return total.item() / (self.steps_per_epoch * dist.world_size)

    def _objective(self, logits: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The training loss: distillation from the teacher, or the precision's loss; plus
        the bin regularizer weighted by obr_lambda with --obr."""
        if self.teacher is not None:
            with torch.no_grad():
                teacher_probs = self.teacher(x).float().softmax(dim=1)
            loss = kd_loss(logits, teacher_probs)
        else:
            loss = self.loss_fn(logits, y)
        if self.config.obr:
            weight = qat.obr_lambda(self.step, self.steps_per_epoch * self.config.epochs)
            if weight > 0:  # zero for the first quarter of training: skip the work
                terms = [
                    qat.bin_regularizer(w, q.scale, q.bits)
                    for _, w, q in qat.quantized_weights(self.model)
                ]
                loss = loss + weight * torch.stack(terms).sum()
        return loss

    @torch.no_grad()
    def _track_oscillation(self) -> None:
        """Each quantized weight's codes after the step, against those after the last one."""
        for name, weight, quantizer in qat.quantized_weights(self.model):
            self.trackers[name].update(quantizer.codes(weight))

    def _oscillation(self) -> float:
        """The epoch's mean fraction of changed codes, averaged over the quantized weights."""
        fractions = [tracker.epoch_fraction() for tracker in self.trackers.values()]
        return torch.stack(fractions).mean().item()

    def _optimizer_step(self) -> None:
        """optimizer.step(), through AdaptiveLR when it is on. Under DDP the layers' gradient
        statistics are summed over the processes first (one all-reduce), so every process
        scales its learning rates alike and the replicas stay identical."""
        if self.adaptive is None:
            self.optimizer.step()
            return
        if self.dist.world_size > 1:
            probes = [
                probe
                for parameter in self.model.parameters()
                if (probe := stats.probe_of(parameter)) is not None and probe.grad is not None
            ]
            if probes:
                summed = self.dist.all_reduce_sum(torch.cat([p.grad for p in probes]))
                for probe, grad in zip(probes, summed.split(3), strict=True):
                    probe.grad.copy_(grad)
        self.adaptive.step()

    def _announce_rewrite(self, seconds: float) -> None:
        """After the first step: say what gradq rewrote; refuse to go on if it never ran."""
        if self.gradq.graphs == 0:
            raise RuntimeError(
                "torch.compile ran the model without calling gradq's backend (Dynamo's "
                "recompile limit reached after many runs in one process?): the model would "
                "train in float. Call torch._dynamo.reset() between runs."
            )
        self.rewritten_ops = self.gradq.rewritten
        if self.dist.is_main:
            note(
                f"gradq ({self.backend}) rewrote {self.gradq.rewritten} matmul-like ops into "
                f"quantized GEMMs in {self.gradq.graphs} graph(s) (`python -m gradq_fx report` "
                f"says which run in INT8); first step {seconds:.1f} s"
            )

    @torch.no_grad()
    def evaluate(self) -> tuple[float, float]:
        """(test cross-entropy, top-1 in percent) over the whole test set, all processes."""
        self.net.eval()
        device, batch_size = self.dist.device, self.config.batch_size
        sums = torch.zeros(3, dtype=torch.float64, device=device)  # loss, correct, count
        for images, labels in self.test_loader:
            count = labels.shape[0]
            x = self.transform(images)
            if count < batch_size:  # pad to the compiled batch size rather than recompile
                x = torch.cat([x, x.new_zeros(batch_size - count, *x.shape[1:])])
            y = labels.to(device)
            with self._autocast():
                logits = self.net(x.to(device))[:count].float()
            sums[0] += F.cross_entropy(logits, y, reduction="sum")
            sums[1] += (logits.argmax(dim=1) == y).sum()
            sums[2] += count
        loss, correct, count = self.dist.all_reduce_sum(sums).tolist()
        return loss / count, 100.0 * correct / count

    # The run.

    def _announce(self) -> None:
        c, data = self.config, self.data
        note(
            f"gradq_fx train: {c.model} ({describe(self.model)}), precision {c.precision}, "
            f"{self.dist.world_size} process(es) on {self.dist.device.type}"
        )
        note(
            f"data: {data.source}: {len(data.train)} training and {len(data.test)} test images, "
            f"{data.num_classes} classes, {c.img_size} px"
        )
        if self.backend is not None:
            chosen = "--backend" if c.backend else f"the default on {self.dist.device.type}"
            note(
                f"torch.compile backend {self.backend} ({chosen}: {BACKEND_NOTES[self.backend]}), "
                f"options {c.gradq_options()}"
            )
        elif c.compile:
            note("torch.compile backend inductor")
        if c.lsq:
            note(
                f"LSQ W{c.weight_bits}A{c.activation_bits} on {len(self.lsq_layers)} Linears "
                f"(learnable step sizes){'; bin regularizer (--obr)' if c.obr else ''}"
            )
        objective = "ch_loss" if c.uses_ch_loss else "cross-entropy"
        if c.teacher is not None:
            objective = f"kd_loss from the teacher {c.teacher}"
        note(
            f"loss {objective}; {c.optimizer} "
            f"{'with adaptive per-layer lr ' if c.uses_adaptive_lr else ''}"
            f"lr {c.learning_rate:g}, weight decay {c.weight_decay:g}; {self.steps_per_epoch} "
            f"steps per epoch of {c.batch_size} x {self.dist.world_size}, "
            f"{self.warmup_steps} warm-up steps"
        )
        if self.epoch:
            note(f"resumed after epoch {self.epoch} (step {self.step})")
        note(f"output: {c.out_dir}")

    def fit(self) -> dict | None:
        """Train the remaining epochs; return result.json's contents (None if stopped early)."""
        c = self.config
        optimize_ddp = torch._dynamo.config.optimize_ddp
        if self.dist.world_size > 1 and self.gradq is not None:
            # Dynamo's DDPOptimizer splits a graph that is compiled inside DDP's forward at
            # the gradient buckets and compiles the pieces on fake tensors; gradq's backends
            # then return fake outputs. Compile one whole graph per process instead: DDP
            # all-reduces once the compiled backward has produced the gradients.
            torch._dynamo.config.optimize_ddp = False
        try:
            if self.dist.is_main:
                c.out_dir.mkdir(parents=True, exist_ok=True)
                self._announce()
            for epoch in range(self.epoch, c.stop_after or c.epochs):
                start = time.perf_counter()
                train_loss = self.train_epoch(epoch)
                test_loss, test_top1 = self.evaluate()
                self.epoch = epoch + 1
                row = dict(
                    epoch=self.epoch,
                    step=self.step,
                    train_loss=train_loss,
                    test_loss=test_loss,
                    test_top1=test_top1,
                    lr=self.last_lr,
                    seconds=time.perf_counter() - start,
                )
                if self.trackers:
                    row["oscillation"] = self._oscillation()
                self.history.append(row)
                self._write_epoch()
                if self.dist.is_main:
                    note(
                        f"epoch {self.epoch}/{c.epochs}: train loss {train_loss:.4f}, "
                        f"test loss {test_loss:.4f}, top-1 {test_top1:.2f}% "
                        f"({row['seconds']:.1f} s)"
                    )
            if self.epoch < c.epochs:
                if self.dist.is_main:
                    note(f"stopped after epoch {self.epoch}; continue with --resume")
                return None
            result = self._result()
            if self.dist.is_main:
                path = c.out_dir / RESULT_NAME
                path.write_text(json.dumps(result, indent=2) + "\n")
                note(f"top-1 {result['top1']:.2f}% -> {path}")
            return result
        finally:
            torch._dynamo.config.optimize_ddp = optimize_ddp
            self.train_net = self.net  # free DDP before its process group (`Distributed.close`)
            self.dist.close()

    def _write_epoch(self) -> None:
        """Checkpoint (collective: gathers every process's RNG state), log.csv, curves.png."""
        state = self._state()
        if not self.dist.is_main:
            return
        out = self.config.out_dir
        checkpoint.save(out / checkpoint.CHECKPOINT_NAME, state)
        with open(out / LOG_NAME, "w", newline="") as file:
            fields = QAT_LOG_FIELDS if self.trackers else LOG_FIELDS
            writer = csv.DictWriter(file, fieldnames=fields)
            writer.writeheader()
            writer.writerows(self.history)
        draw_curves(self.history, out / CURVES_NAME)

    def _replicas_in_sync(self) -> bool:
        """Whether every process ends with bitwise the same weights (collective), as DDP's
        averaged gradients should leave them."""
        with torch.no_grad():
            checksum = sum(p.double().sum().item() for p in self.model.parameters())
        return len(set(self.dist.all_gather_object(checksum))) == 1

    def _result(self) -> dict[str, Any]:
        """result.json's contents (collective: checks that the replicas agree)."""
        c, last = self.config, self.history[-1]
        in_sync = self._replicas_in_sync()
        if not in_sync and self.dist.is_main:
            note("warning: the processes ended with different weights")
        options = c.gradq_options()
        return {
            "top1": last["test_top1"],
            "test_loss": last["test_loss"],
            "train_loss": last["train_loss"],
            "epochs": self.epoch,
            "steps": self.step,
            "seconds": sum(row["seconds"] for row in self.history),
            "model": c.model,
            "precision": c.precision,
            "backend": self.backend or ("inductor" if c.compile else "eager"),
            "gradq_options": None if options is None else self._gradq_config().to_options(),
            "gradq_rewritten_ops": self.rewritten_ops,
            "lsq_bits": {name: list(bits) for name, bits in qat.lsq_bits(self.model).items()},
            "oscillation": last.get("oscillation"),
            "adaptive_lr": c.uses_adaptive_lr,
            "world_size": self.dist.world_size,
            "replicas_in_sync": in_sync,
            "device": str(self.dist.device),
            "data": self.data.source,
            "train_images": len(self.data.train),
            "test_images": len(self.data.test),
            "config": c.to_dict(),
        }
