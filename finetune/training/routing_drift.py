"""Routing drift: how the routing of the model being trained departs from the reference's, and whether DPO's chosen
and rejected completions are routed differently.

The reference (DPO: the SFT model; SFT: the base) is the trained model before its first optimizer step, so its
routing is recorded once, at the start of training, on a probe set of held-out sequences (the test split, drawn
with the recipe's seed): no second model copy and no second pass per log. Every `logging_steps` the same sequences
run through the model being trained (no gradients, LM head on one position only) and, per MoE layer, three numbers
compare the two: the mean Jaccard overlap of the top-k expert sets, KL(policy || reference) of the router
distributions (softmax of the router logits) and the share of tokens whose top-1 expert (the chosen expert with the
highest logit) changed. They are logged (`routing_overlap`, `routing_kl`, `routing_top1_changed`: means over layers)
and kept per layer in `routing_drift.json`. The probe is thinned at the first log to stay under
`routing.max_overhead` of training time, and the share it took is recorded.

DPO also compares, per layer, the expert load of the chosen completions' tokens with that of the rejected ones
(Jensen-Shannon divergence) on a seeded sample of training pairs, before and after training.

Nothing here changes training: the passes run without gradients, in eval mode, with the random state restored, and
the training-load hooks (finetune/training/expert_load.py) ignore them. Each process probes its share of the sequences;
the sums are reduced over processes (every process runs the same number of forwards, as ZeRO-3 and FSDP2 gather
weights collectively) and rank 0 writes.
"""

from __future__ import annotations

import contextlib
import json
import statistics
import time
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import TrainerCallback

from finetune.core import distributed, families
from finetune.modeling import moe
from finetune.config.recipe import RoutingConfig

MIN_PROBE = 8  # the probe keeps at least this many sequences, whatever it costs
DEFAULT_MAX_LENGTH = 1024  # probe sequences are cut here when the trainer sets no max_length


# ---------------------------------------------------------------- sequences

def drawn(dataset, count: int, seed: int) -> list[int]:
    """`count` row indices of `dataset` in a seeded random order, trimmed to a multiple of the process count (each
    process runs the same number of forwards)."""
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(dataset), generator=generator)[:count].tolist()
    return order[:len(order) - len(order) % distributed.world_size()]


def probe_rows(dataset, count: int, seed: int, max_length: int) -> list[list[int]]:
    """Token ids of the probe: SFT conversations (`input_ids`), or DPO prompts with their chosen completion."""
    rows = dataset.select(drawn(dataset, count, seed))
    if "input_ids" in dataset.column_names:
        return [ids[:max_length] for ids in rows["input_ids"]]
    return [(p + c)[:max_length] for p, c in zip(rows["prompt_ids"], rows["chosen_ids"])]


def pair_rows(dataset, count: int, seed: int, max_length: int) -> dict[str, list[tuple[list[int], list[bool]]]]:
    """Sampled training pairs as chosen and rejected sequences, each with the mask of its completion tokens."""
    rows = dataset.select(drawn(dataset, count, seed))
    return {side: [((p + c)[:max_length], ([False] * len(p) + [True] * len(c))[:max_length])
                   for p, c in zip(rows["prompt_ids"], rows[f"{side}_ids"])]
            for side in ("chosen", "rejected")}


def my_share(items: list) -> list:
    """This process's items (every world_size-th): the processes together cover all of them once."""
    return items[distributed.rank()::distributed.world_size()]


# ---------------------------------------------------------------- one pass over sequences

class RouterCapture:
    """While active, each router's output for the batch being run: log-probs over experts and the top-k chosen.

    The routers are found once, in the model as the stage loaded it: their names stay those of the model, whatever
    wrapper (PEFT, DeepSpeed) the trainer runs it in."""

    def __init__(self, family: families.Family, found: dict[str, nn.Module], sizes: tuple[int, int]):
        self.family, self.found, self.sizes = family, found, sizes
        self.outputs: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.handles = []

    def __enter__(self):
        for name, module in self.found.items():
            self.handles.append(module.register_forward_hook(self.hook(name)))
        return self

    def __exit__(self, *exc):
        for handle in self.handles:
            handle.remove()
        self.handles = []

    def hook(self, name: str):
        def hook(module, args, output):
            logits = moe.router_logits(self.family, output, self.sizes).detach()
            logits = logits.reshape(-1, logits.shape[-1]).float()
            top_k = moe.top_k_indices(self.family, output, module, self.sizes).detach()
            self.outputs[name] = (torch.log_softmax(logits, dim=-1), top_k.reshape(logits.shape[0], -1))
        return hook


@contextlib.contextmanager
def quiet_pass(model: nn.Module):
    """No gradients, eval mode, the random state untouched: a pass that cannot change what training does next."""
    was_training = model.training
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices), torch.no_grad():
        model.eval()
        try:
            yield
        finally:
            model.train(was_training)


def routed(model: nn.Module, capture: RouterCapture, sequences: list[list[int]], device, pad_id: int,
           batch_size: int):
    """Per batch of sequences: {layer: (log-probs, top-k)} of their real tokens, in sequence order."""
    with quiet_pass(model), capture:
        for start in range(0, len(sequences), batch_size):
            chunk = sequences[start:start + batch_size]
            longest = max(len(ids) for ids in chunk)
            input_ids = torch.tensor([ids + [pad_id] * (longest - len(ids)) for ids in chunk], device=device)
            mask = torch.tensor([[1] * len(ids) + [0] * (longest - len(ids)) for ids in chunk], device=device)
            # The LM head on one position only: the routers are all this pass reads.
            model(input_ids=input_ids, attention_mask=mask, use_cache=False, logits_to_keep=1,
                  output_router_logits=False)
            real = mask.reshape(-1).bool()
            yield {name: (log_probs[real.to(log_probs.device)].cpu(), top_k[real.to(top_k.device)].cpu())
                   for name, (log_probs, top_k) in capture.outputs.items()}


def restart_zero3_trace(optimizer) -> None:
    """After probe passes under ZeRO-3: make DeepSpeed record its module trace again at the next training step.

    DeepSpeed ZeRO-3 records the order in which one step's forward and backward use each module, and from then on
    fetches and frees shards by that record; every forward of the model starts a new record step. Probe forwards
    run before the first training step would become that record, forward only, and the first backward then finds
    shards freed that it needs ("The size of tensor a (0) must match the size of tensor b (64)"). Invalidating the
    record makes the next step record it from the real training step (that one step goes without prefetching)."""
    offload = getattr(getattr(optimizer, "optimizer", optimizer), "parameter_offload", None)
    coordinator = offload.get_param_coordinator() if offload is not None else None
    if coordinator is not None and not coordinator.is_invalid_trace():
        coordinator._invalidate_trace()


def as_sets(top_k: torch.Tensor, experts: int) -> torch.Tensor:
    return torch.zeros(top_k.shape[0], experts, dtype=torch.bool).scatter_(1, top_k.long(), True)


def top1(log_probs: torch.Tensor, top_k: torch.Tensor) -> torch.Tensor:
    """The chosen expert with the highest router logit (top-k indices are not always sorted, e.g. DeepSeek-V3)."""
    return top_k.long().gather(1, log_probs.gather(1, top_k.long()).argmax(dim=1, keepdim=True)).squeeze(1)


def drift_sums(policy: tuple[torch.Tensor, torch.Tensor], reference: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """(sum of Jaccard overlaps, sum of KL(policy || reference), tokens whose top-1 changed, tokens) of one layer."""
    (p_log, p_top), (r_log, r_top) = policy, reference
    experts = p_log.shape[1]
    p_set, r_set = as_sets(p_top, experts), as_sets(r_top, experts)
    jaccard = (p_set & r_set).sum(1) / (p_set | r_set).sum(1)
    kl = (p_log.exp() * (p_log - r_log)).sum(1)
    changed = top1(p_log, p_top) != top1(r_log, r_top)
    return torch.tensor([jaccard.sum().item(), kl.sum().item(), changed.sum().item(), p_log.shape[0]],
                        dtype=torch.float64)


def js_divergence(a: torch.Tensor, b: torch.Tensor) -> float:
    """Jensen-Shannon divergence (natural log; 0 to ln 2) between two load distributions."""
    middle = (a + b) / 2

    def kl(x):
        keep = x > 0
        return float((x[keep] * (x[keep] / middle[keep]).log()).sum())
    return (kl(a) + kl(b)) / 2


def significant(value) -> float:
    """A float to 6 significant figures (a small KL stays readable in the json, unlike rounding to places)."""
    return float(f"{float(value):.6g}")


def shares(counts: torch.Tensor) -> torch.Tensor:
    total = counts.sum()
    return counts / total if total > 0 else counts


# ---------------------------------------------------------------- the callback

class RoutingDriftCallback(TrainerCallback):
    def __init__(self, model: nn.Module, config: RoutingConfig, stage: str, folder: Path, probe: list[list[int]],
                 pairs: dict | None, pad_id: int, batch_size: int):
        self.config, self.stage, self.folder = config, stage, Path(folder)
        found = moe.routers(model)
        self.layers = list(found)
        self.capture = RouterCapture(families.family_of(model), found, moe.routing_sizes(model))
        self.experts = moe.num_experts(model, *next(iter(found.items())))
        self.probe, self.pairs, self.pad_id = my_share(probe), pairs, pad_id
        self.batch_size = batch_size  # the training batch's: what fits in memory with gradients fits without
        self.probe_total = len(probe)
        self.reference: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.lengths: list[int] = [len(ids) for ids in self.probe]
        self.kept: int | None = None  # probe sequences per process, fixed at the first log
        self.seconds_per_sequence = 0.0
        self.probe_seconds = 0.0
        self.record = {"stage": stage, "layers": self.layers, "history": [], "chosen_vs_rejected": {}}

    @property
    def output_file(self) -> Path:
        return self.folder / "routing_drift.json"

    def reference_file(self) -> Path:
        return self.folder / f"routing_reference.rank{distributed.rank()}.safetensors"

    # -- start

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        if state.global_step == 0:
            self.record_reference(model, args.device)
            if self.pairs:
                self.record["chosen_vs_rejected"]["before"] = self.chosen_vs_rejected(model, args.device)
            restart_zero3_trace(optimizer)
        else:
            self.resume(state.global_step)
        self.write()
        self.train_started = time.perf_counter()

    def record_reference(self, model, device) -> None:
        if not self.probe:
            return
        batches, seconds = [], []
        clock = time.perf_counter()
        for batch in routed(model, self.capture, self.probe, device, self.pad_id, self.batch_size):
            batches.append(batch)
            seconds.append(time.perf_counter() - clock)
            clock = time.perf_counter()
        # The median batch: the first forward of a model also pays one-off set-up costs.
        self.seconds_per_sequence = statistics.median(seconds) / min(self.batch_size, len(self.probe))
        for layer in self.layers:
            self.reference[layer] = tuple(torch.cat([batch[layer][i] for batch in batches]) for i in (0, 1))
        tensors = {f"{layer}.{part}": tensor.contiguous() for layer, pair in self.reference.items()
                   for part, tensor in zip(("log_probs", "top_k"), pair)}
        save_file(tensors, str(self.reference_file()),
                  metadata={"seconds_per_sequence": repr(self.seconds_per_sequence)})

    def resume(self, step: int) -> None:
        """A resumed run compares with the reference recorded when the run started, not with its resumed weights."""
        path = self.reference_file()
        if self.probe and path.is_file():
            with safe_open(str(path), "pt") as saved:
                self.seconds_per_sequence = float(saved.metadata()["seconds_per_sequence"])
            tensors = load_file(str(path))
            self.reference = {layer: (tensors[f"{layer}.log_probs"], tensors[f"{layer}.top_k"])
                              for layer in self.layers}
        elif self.probe and distributed.is_main_process():
            print(f"[{self.stage}] routing drift: no reference recorded at the start of this run in {self.folder}; "
                  f"drift is not measured after resuming.", flush=True)
        if self.output_file.is_file():
            earlier = json.loads(self.output_file.read_text())
            self.record["history"] = [entry for entry in earlier["history"] if entry["step"] <= step]
            self.record["chosen_vs_rejected"] = earlier.get("chosen_vs_rejected", {})

    # -- every log

    def on_log(self, args, state, control, logs=None, model=None, optimizer=None, **kwargs):
        if logs is None or "loss" not in logs or not self.reference:
            return
        if self.kept is None:
            self.kept = self.probe_size(time.perf_counter() - self.train_started)
        started = time.perf_counter()
        per_layer = self.drift(model, args.device)
        restart_zero3_trace(optimizer)
        self.probe_seconds += time.perf_counter() - started
        values = {f"routing_{name}": significant(sum(layer[name] for layer in per_layer.values()) / len(per_layer))
                  for name in ("overlap", "kl", "top1_changed")}
        logs.update(values)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(values)
        self.record["history"].append({"step": state.global_step, **values, "layers": per_layer})
        self.write()

    def probe_size(self, first_interval_s: float) -> int:
        """Probe sequences per process that keep a probe under max_overhead of the time between two logs (the
        first interval measured), agreed by all processes."""
        wanted = len(self.probe)
        if self.config.max_overhead is not None and self.seconds_per_sequence > 0:
            affordable = int(self.config.max_overhead * first_interval_s / self.seconds_per_sequence)
            wanted = max(min(MIN_PROBE, wanted), min(affordable, wanted))
        agreed = distributed.sum_across_processes(torch.tensor([wanted], dtype=torch.long))
        return int(agreed.item()) // distributed.world_size()

    def drift(self, model, device) -> dict[str, dict[str, float]]:
        sequences = self.probe[:self.kept]
        tokens = sum(self.lengths[:self.kept])
        sums = torch.zeros(len(self.layers), 4, dtype=torch.float64)
        offset = 0
        for batch in routed(model, self.capture, sequences, device, self.pad_id, self.batch_size):
            count = next(iter(batch.values()))[0].shape[0]
            for index, layer in enumerate(self.layers):
                reference = tuple(part[offset:offset + count] for part in self.reference[layer])
                sums[index] += drift_sums(batch[layer], reference)
            offset += count
        assert offset == tokens
        sums = distributed.sum_across_processes(sums)
        return {layer: {"overlap": significant(s[0] / s[3]), "kl": significant(s[1] / s[3]),
                        "top1_changed": significant(s[2] / s[3])} for layer, s in zip(self.layers, sums)}

    # -- chosen vs rejected

    def chosen_vs_rejected(self, model, device) -> dict[str, dict]:
        """Per layer: the expert-load shares of chosen and of rejected completion tokens, and their JS divergence."""
        counts = {}
        for side, rows in self.pairs.items():
            rows = my_share(rows)
            side_counts = torch.zeros(len(self.layers), self.experts, dtype=torch.float64)
            masks = [mask for _, mask in rows]
            done = 0
            for batch in routed(model, self.capture, [ids for ids, _ in rows], device, self.pad_id, self.batch_size):
                chunk = masks[done:done + self.batch_size]
                completion = torch.tensor([flag for mask in chunk for flag in mask])
                done += len(chunk)
                for index, layer in enumerate(self.layers):
                    top_k = batch[layer][1][completion].reshape(-1).long()
                    top_k = top_k[top_k < side_counts.shape[1]]  # LongCat-Flash's zero-computation experts: no load
                    side_counts[index] += torch.bincount(top_k, minlength=side_counts.shape[1]).double()
            counts[side] = distributed.sum_across_processes(side_counts)
        result = {}
        for index, layer in enumerate(self.layers):
            chosen, rejected = shares(counts["chosen"][index]), shares(counts["rejected"][index])
            result[layer] = {"js": significant(js_divergence(chosen, rejected)),
                             "chosen": [significant(x) for x in chosen],
                             "rejected": [significant(x) for x in rejected]}
        return result

    # -- end

    def on_train_end(self, args, state, control, model=None, **kwargs):
        if self.pairs:
            self.record["chosen_vs_rejected"]["after"] = self.chosen_vs_rejected(model, args.device)
        trained = time.perf_counter() - self.train_started - self.probe_seconds
        self.record["probe"] = {
            "sequences": self.probe_total, "kept": (self.kept or 0) * distributed.world_size(),
            "seconds": round(self.probe_seconds, 3), "training_seconds": round(trained, 3),
            "overhead": round(self.probe_seconds / trained, 4) if trained > 0 else None}
        self.write()
        self.reference_file().unlink(missing_ok=True)  # needed to resume only; the stage's output keeps the json
        if self.reference and distributed.is_main_process():
            probe = self.record["probe"]
            print(f"[{self.stage}] routing probe: {probe['kept']} of {probe['sequences']} held-out sequences, "
                  f"{probe['seconds']:.1f} s of {probe['training_seconds']:.1f} s training "
                  f"({100 * (probe['overhead'] or 0):.1f}%)", flush=True)

    def write(self) -> None:
        if distributed.is_main_process():
            tmp = self.output_file.with_name(self.output_file.name + ".tmp")
            tmp.write_text(json.dumps(self.record, indent=1))
            tmp.replace(self.output_file)


def attach(trainer, model: nn.Module, config: RoutingConfig, stage: str, folder: Path, seed: int) -> None:
    """Routing drift (and, for DPO, chosen vs rejected routing) on a TRL SFT or DPO trainer of an MoE `model`."""
    if not moe.is_moe_model(model) or not (config.probe_sequences or config.pair_sample):
        return
    max_length = trainer.args.max_length or DEFAULT_MAX_LENGTH
    probe = []
    if config.probe_sequences and trainer.eval_dataset is not None:
        probe = probe_rows(trainer.eval_dataset, config.probe_sequences, seed, max_length)
    elif config.probe_sequences and distributed.is_main_process():
        print(f"[{stage}] routing drift is not measured: the data has no test split (data.test_size) to probe.")
    pairs = None
    if config.pair_sample and "rejected_ids" in trainer.train_dataset.column_names:
        pairs = pair_rows(trainer.train_dataset, config.pair_sample, seed, max_length)
    if probe or pairs:
        pad_id = trainer.processing_class.pad_token_id
        trainer.add_callback(RoutingDriftCallback(model, config, stage, folder, probe, pairs,
                                                  0 if pad_id is None else pad_id,
                                                  trainer.args.per_device_train_batch_size))
