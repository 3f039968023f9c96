"""Trial arrays: K configurations that share a batch size, trained as ONE stacked model on one device.

Each member trains as `trainable.fit.Trainer` would train it alone, so its metrics are the ones
its separate run gives. No Ray here, and no import of `tuning/`.

- Initialisation: `torch.manual_seed(config.seed)`, then `build(config)`, member by member, as
  the Trainer does; the weights are stacked with `torch.func.stack_module_state` (a leading
  member dimension K).
- Forward and backward: for the tutorial's MLP (`nn.Sequential` of Flatten, Linear, ReLU: the
  default `build`, any widths) one batched matmul per layer, `_BatchedLinear` (baddbmm, bias
  inside the matmul as nn.Linear's addmm); for any other `build`, `torch.func.functional_call`
  of a template model under `torch.vmap`. Batched matmuls for the MLP because on a CPU each
  member's logits and gradients come out bit for bit those of its own model, fp32 and bf16
  (vmap's linear adds the bias after the matmul, in fp32 under autocast, so a bf16 member
  drifts from its separate run by bf16 rounding within an epoch), and because they are faster
  (docs/speed.md, "Trial arrays"). Most of that is memory: autograd's bmm returns the stacked
  weight gradients transposed, and a gradient above 32 MB is mapped and page-faulted afresh by
  glibc every step; `_BatchedLinear` writes it in the weights' layout into a buffer kept
  between steps.
- Data order: member k draws its own permutation each epoch, `torch.randperm(n, generator=
  torch.Generator().manual_seed(epoch_seed(seed_k, epoch_k)))` as `loops.train_epoch` does, and
  step s gathers one (K, B) index into one (K, B, ...) batch: member k sees the batches of its
  own run. When all members have the same (seed, epoch), as a search's trials do (seed 42), the
  permutations are equal and each batch is gathered once and shared (expanded, not copied).
- Loss: cross-entropy per member, the mean over its batch; the backward pass is of the sum over
  members, whose gradient for member k's weights is member k's own. Divergence is checked per
  member every `DIVERGENCE_CHECK_STEPS` steps (one device sync, as the Trainer's check): a
  member whose running loss is NaN/inf leaves the array there with the metrics its own run
  reports (train_loss NaN, train accuracy so far, evaluated on its weights at that step).
- Optimizer: one step over the stack with the formulas of torch's fused kernels, every
  hyperparameter a (K,) tensor broadcast over the member dimension: SGD (momentum, dampening 0,
  weight decay as L2), Nesterov, Adam (L2 decay), AdamW (decoupled decay, w *= 1 - lr*wd), eps
  1e-8, betas (0.9, 0.999), bias correction from each member's own step count, lr per member
  per epoch from `fit.epoch_lr` (constant or cosine over its own epochs). The operations round
  as torch's CPU kernels do (fused multiply-adds where they fuse, not where they do not): SGD
  and Nesterov updates are bit for bit torch's, Adam's differ in the last bit of a few in 10^5
  elements a step. A hyperparameter at zero gives torch's result exactly (x*0, x+0 and x*1
  leave a finite x as it is), so SGD with and without momentum or decay share one formula, and
  Nesterov and plain momentum are mixed by per-member coefficients. Every operation is in place
  (no K-sized temporaries), but it is still ~7 passes over the stacked weights a step where
  torch's fused kernel makes one: on a CPU the step costs as much as the GEMMs.
- Mixed optimizer families are allowed: members are kept in the stack grouped by family (sgd
  and nesterov first, then adam and adamw) and each family's formula runs on its contiguous
  slice of the stacked tensors, a view: a mixed array costs one step per member, not both
  formulas for everyone. Member ids stay the configs' indices.
- Precision: fp32, or bf16 autocast where `fit.autocast_dtype` says so (all members agree). Not
  the fused bf16 CPU step (`trainable/fused.py`): in bf16 a member matches its separate run with
  autocast and torch's step. Under autocast every Linear would cast its fp32 weights to bf16 at
  each use; here those weights are cast once per step, after the update, into bf16 tensors the
  passes run on (contiguous, as a model's own: oneDNN's bf16 GEMMs round differently for a
  transposed weight). Same numbers; the casts under vmap cost as much as the bf16 GEMMs saved.
- Leaving: a member leaves when its last epoch has been reported (at the start of the next
  `run_epoch`, so its final state can still be saved), when it diverges, or by `remove(member)`
  (ASHA stopping it, the stall rule): weights, optimizer state and per-member hyperparameters
  are compacted with `index_select`, and the others continue unchanged.
- State: `member_state_dict(i)` is in `Trainer.state_dict()`'s format (the model's state dict,
  torch's own optimizer state dict, the history): a plain Trainer of the same config resumes
  it; `load_member_state(i, state)` starts a member from a Trainer's checkpoint.
- Timing: a member's `epoch_seconds` is the array's wall time for that epoch (train and test,
  shared by its members) and `samples_per_second` its training images over the array's training
  time, what the member experienced; a search summing trial-seconds counts an array's epoch
  once per member.

On a CPU arrays are slower than the same trials one after another, so a search uses them only
when asked; the figures, and why, are in docs/speed.md ("Trial arrays"). They are meant for GPUs,
where one small model leaves most of the chip idle.
"""
from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from trainable import challenge
from trainable.config import TrainConfig
from trainable.fit import epoch_lr, epoch_metrics, epoch_seed, make_optimizer
from trainable.hardware import autocast_dtype, flush_denormals, keep_freed_memory, precision_label, select_device
from trainable.loops import DIVERGENCE_CHECK_STEPS, autocast, to_unit
from trainable.models import build_model, factory_of

SGD_FAMILY = ("sgd", "nesterov")
ADAM_FAMILY = ("adam", "adamw")
BETAS = (0.9, 0.999)  # torch.optim.Adam's defaults, which make_optimizer keeps
EPS = 1e-8  # torch.optim.Adam's default
EVAL_BATCH = 1024  # images per evaluation step, as loops.evaluate


def _per_member(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(k,) -> (k, 1, ..., 1) to broadcast over a stacked tensor shaped like `like`."""
    return values.view(-1, *([1] * (like.dim() - 1)))


def _same_layout(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """`t` (shaped like `like`, but for dim 0) with its dimensions laid out in memory in `like`'s
    order, dense. Under vmap, autograd returns the stacked weights' gradients transposed ((K,
    out, in) with the `in` dimension outermost); elementwise updates between tensors of
    different layouts stride through memory and ran 10x slower on a CPU, so there the weights
    and optimizer state follow the gradients' layout (once; again after a compaction)."""
    if t.stride()[1:] == like.stride()[1:]:
        return t
    order = sorted(range(like.dim()), key=lambda d: (d != 0, -like.stride(d)))  # member dim first, then outermost
    inverse = sorted(range(len(order)), key=order.__getitem__)
    return t.permute(order).contiguous().permute(inverse)


def _unit(images: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    """uint8 pixels -> [0, 1] as loops.to_unit; floating inputs are used as they are."""
    return to_unit(images, dtype) if images.dtype == torch.uint8 else images


class _SgdFamily:
    """SGD and Nesterov (torch's fused formulas) for one contiguous slice of the stack.

    d = g + wd*w;  b = m*b + d (b starts at 0, so the first step gives b = d as torch does);
    d = nesterov ? d + m*b : b;  w -= lr*d.  With m = 0 this is plain SGD: b = d.
    """

    def __init__(self, configs: Sequence[TrainConfig], shapes: Mapping[str, torch.Size],
                 device: torch.device) -> None:
        self.device = device
        self._hyper(configs)
        self.buffers = {name: torch.zeros(len(configs), *shape, device=device) for name, shape in shapes.items()}
        self.lr = torch.zeros(len(configs), device=device)

    def _hyper(self, configs: Sequence[TrainConfig]) -> None:
        def tensor(values: list[float]) -> torch.Tensor:
            return torch.tensor(values, dtype=torch.float32, device=self.device)

        self.momentum = tensor([c.momentum for c in configs])
        self.weight_decay = tensor([c.weight_decay for c in configs])
        nesterov = [c.optimizer == "nesterov" for c in configs]
        self.nesterov_d = tensor([1.0 if n else 0.0 for n in nesterov])
        self.nesterov_b = tensor([c.momentum if n else 1.0 for c, n in zip(configs, nesterov)])
        # host-side flags: skip the arithmetic no member needs
        self.any_decay = any(c.weight_decay != 0 for c in configs)
        self.any_momentum = any(c.momentum != 0 for c in configs)
        self.all_nesterov, self.any_nesterov = all(nesterov), any(nesterov)

    def set_lr(self, lrs: Sequence[float]) -> None:
        self.lr = torch.tensor(lrs, dtype=torch.float32, device=self.device)  # torch casts lr to float too

    def step(self, weights: Mapping[str, torch.Tensor], grads: Mapping[str, torch.Tensor]) -> None:
        """Update `weights` in place; `grads` are this step's own tensors and are overwritten
        (every operation is in place: no K-sized temporaries)."""
        for name, w in weights.items():
            d = grads[name]
            if self.any_decay:
                d.addcmul_(w, _per_member(self.weight_decay, w))
            if self.any_momentum:
                m = _per_member(self.momentum, w)
                b = self.buffers[name] = _same_layout(self.buffers[name], d)
                b.mul_(m).add_(d)  # two roundings, as torch's kernel (an addcmul would fuse them)
                if self.all_nesterov:
                    d.addcmul_(b, m)
                elif self.any_nesterov:  # d*1 + m*b for Nesterov members, d*0 + 1*b for the others
                    d.mul_(_per_member(self.nesterov_d, w)).addcmul_(b, _per_member(self.nesterov_b, w))
                else:
                    d = b
            w.addcmul_(d, _per_member(self.lr, w), value=-1)

    def select(self, keep: torch.Tensor, configs: Sequence[TrainConfig]) -> None:
        self.buffers = {name: b.index_select(0, keep) for name, b in self.buffers.items()}
        self.lr = self.lr.index_select(0, keep)
        self._hyper(configs)

    def export(self, j: int, name: str, config: TrainConfig, stepped: bool) -> dict[str, torch.Tensor]:
        """Member j's state for parameter `name`, as torch.optim.SGD keeps it."""
        if config.momentum == 0 or not stepped:
            return {}  # torch's SGD keeps no buffer without momentum, and none before the first step
        return {"momentum_buffer": self.buffers[name][j].clone(memory_format=torch.contiguous_format)}

    def load(self, j: int, name: str, entry: Mapping[str, Any]) -> bool:
        """Set member j's state for `name` from torch's; True if there was any."""
        buffer = entry.get("momentum_buffer")
        target = self.buffers[name][j]
        if buffer is None:
            target.zero_()  # no buffer: the next step is torch's first (b = d)
            return False
        target.copy_(buffer)
        return True


class _AdamFamily:
    """Adam and AdamW (torch's fused formulas) for one contiguous slice of the stack.

    AdamW: w *= 1 - lr*wd;  Adam: g += wd*w;  m = lerp(m, g, 1 - beta1);
    v = beta2*v + (1 - beta2)*g*g;  w -= lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps),
    t each member's own step count; the scalar factors in float64, then float32, as torch's kernel.
    """

    def __init__(self, configs: Sequence[TrainConfig], shapes: Mapping[str, torch.Size],
                 device: torch.device) -> None:
        self.device = device
        # float64 for the per-member scalars, as torch's kernel computes them in double (MPS lacks it)
        self.wide = torch.float64 if device.type != "mps" else torch.float32
        self._hyper(configs)
        k = len(configs)
        self.exp_avg = {name: torch.zeros(k, *shape, device=device) for name, shape in shapes.items()}
        self.exp_avg_sq = {name: torch.zeros(k, *shape, device=device) for name, shape in shapes.items()}
        self.steps = torch.zeros(k, dtype=self.wide, device=device)
        self._scratch: dict[str, torch.Tensor] = {}
        self.set_lr([c.lr for c in configs])

    def _hyper(self, configs: Sequence[TrainConfig]) -> None:
        self.l2 = torch.tensor([c.weight_decay if c.optimizer == "adam" else 0.0 for c in configs],
                               dtype=torch.float32, device=self.device)
        self.decoupled = torch.tensor([c.weight_decay if c.optimizer == "adamw" else 0.0 for c in configs],
                                      dtype=self.wide, device=self.device)
        self.any_l2 = any(c.optimizer == "adam" and c.weight_decay != 0 for c in configs)
        self.any_decoupled = any(c.optimizer == "adamw" and c.weight_decay != 0 for c in configs)

    def set_lr(self, lrs: Sequence[float]) -> None:
        self.lr = torch.tensor(lrs, dtype=self.wide, device=self.device)
        self.decay = (1 - self.lr * self.decoupled).float()  # AdamW's factor; exactly 1 where wd = 0

    def step(self, weights: Mapping[str, torch.Tensor], grads: Mapping[str, torch.Tensor]) -> None:
        self.steps += 1
        beta1, beta2 = BETAS
        step_size = (self.lr / (1 - torch.pow(beta1, self.steps))).float()
        bias_correction2_sqrt = torch.sqrt(1 - torch.pow(beta2, self.steps)).float()
        for name, w in weights.items():
            g = grads[name]  # this step's own tensor: reused for the denominator, all in place
            if self.any_decoupled:
                w.mul_(_per_member(self.decay, w))
            if self.any_l2:
                g.addcmul_(w, _per_member(self.l2, w))
            m = self.exp_avg[name] = _same_layout(self.exp_avg[name], g)
            v = self.exp_avg_sq[name] = _same_layout(self.exp_avg_sq[name], g)
            m.lerp_(g, 1 - beta1)
            v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
            denom = torch.sqrt(v, out=g).div_(_per_member(bias_correction2_sqrt, w)).add_(EPS)
            scratch = self._scratch.get(name)
            if scratch is None or scratch.stride() != g.stride():
                scratch = self._scratch[name] = torch.empty_like(g)  # kept: no K-sized allocation a step
            w.sub_(torch.mul(m, _per_member(step_size, w), out=scratch).div_(denom))  # (lr_t * m) / denom

    def select(self, keep: torch.Tensor, configs: Sequence[TrainConfig]) -> None:
        self.exp_avg = {name: t.index_select(0, keep) for name, t in self.exp_avg.items()}
        self.exp_avg_sq = {name: t.index_select(0, keep) for name, t in self.exp_avg_sq.items()}
        self.steps = self.steps.index_select(0, keep)
        self._scratch = {}
        lrs = self.lr.index_select(0, keep).tolist()
        self._hyper(configs)
        self.set_lr(lrs)

    def export(self, j: int, name: str, config: TrainConfig, stepped: bool) -> dict[str, torch.Tensor]:
        """Member j's state for parameter `name`, as torch.optim.Adam(W) keeps it."""
        steps = float(self.steps[j])
        if steps == 0:
            return {}
        # torch's fused optimizers keep `step` as a float32 scalar on the parameters' device
        where = self.device if self.device.type in ("cpu", "cuda") else torch.device("cpu")
        return {"step": torch.tensor(steps, dtype=torch.float32, device=where),
                "exp_avg": self.exp_avg[name][j].clone(memory_format=torch.contiguous_format),
                "exp_avg_sq": self.exp_avg_sq[name][j].clone(memory_format=torch.contiguous_format)}

    def load(self, j: int, name: str, entry: Mapping[str, Any]) -> bool:
        if "exp_avg" not in entry:
            self.exp_avg[name][j].zero_()
            self.exp_avg_sq[name][j].zero_()
            self.steps[j] = 0
            return False
        self.exp_avg[name][j].copy_(entry["exp_avg"])
        self.exp_avg_sq[name][j].copy_(entry["exp_avg_sq"])
        self.steps[j] = float(entry["step"])
        return True


class _BatchedLinear(torch.autograd.Function):
    """K linear layers at once: h (K, B, in) @ w (K, out, in)^T + b (K, out), as nn.Linear's
    addmm computes each (bias inside the matmul). The backward pass writes the weight gradient
    as g^T h, in the weights' own (K, out, in) layout: autograd's bmm would give it transposed,
    and the updates then stride through memory (a transposing copy of the K=16 stack of the
    first layer cost ~150 ms on the 2-core Xeon, as much as a step's GEMMs), into `grad_w_out`
    when given: a buffer kept between steps, as glibc maps (and page-faults) every block above
    32 MB afresh. On a CPU each member's outputs and gradients are bit for bit those of its own
    nn.Linear, fp32 and bf16."""

    @staticmethod
    def forward(ctx: Any, h: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None,
                grad_w_out: torch.Tensor | None = None) -> torch.Tensor:
        ctx.save_for_backward(h, w)
        ctx.has_bias = b is not None
        ctx.grad_w_out = grad_w_out
        wt = w.transpose(1, 2)
        return torch.bmm(h, wt) if b is None else torch.baddbmm(b.unsqueeze(1), h, wt)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        h, w = ctx.saved_tensors
        grad_h = torch.bmm(g, w) if ctx.needs_input_grad[0] else None
        grad_w = torch.bmm(g.transpose(1, 2), h, out=ctx.grad_w_out) if ctx.needs_input_grad[1] else None
        grad_b = g.sum(1) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return grad_h, grad_w, grad_b, None


def _mlp_plan(model: nn.Module) -> list[tuple[str, str | None, str | None]] | None:
    """[("flatten"|"linear"|"relu", weight name, bias name)] when `model` is an nn.Sequential of a
    leading Flatten and Linear and ReLU layers (the tutorial's MLP, any widths): the layers the
    batched-matmul forward knows. None for anything else (vmap then)."""
    children = list(model.children()) if isinstance(model, nn.Sequential) else []
    if not children or type(children[0]) is not nn.Flatten:
        return None
    plan: list[tuple[str, str | None, str | None]] = []
    for index, (name, layer) in enumerate(model.named_children()):
        if type(layer) is nn.Flatten and index == 0 and (layer.start_dim, layer.end_dim) == (1, -1):
            plan.append(("flatten", None, None))
        elif type(layer) is nn.Linear:
            plan.append(("linear", f"{name}.weight", f"{name}.bias" if layer.bias is not None else None))
        elif type(layer) is nn.ReLU:
            plan.append(("relu", None, None))
        else:
            return None
    return plan if any(kind == "linear" for kind, _, _ in plan) else None


def _family(config: TrainConfig) -> str:
    return "adam" if config.optimizer in ADAM_FAMILY else "sgd"


class ArrayTrainer:
    """K configurations that share a batch size and precision, trained as one stacked model.

    Member ids are the indices of `configs`. `run_epoch()` trains every member still in the
    array one epoch (each its own next epoch) and returns {member id: metrics}, the metrics of
    `Trainer.run_epoch`.
    """

    def __init__(
        self,
        configs: Sequence[TrainConfig],
        train_x: torch.Tensor,
        train_y: torch.Tensor,
        test_x: torch.Tensor,
        test_y: torch.Tensor,
        *,
        input_shape: Sequence[int],
        num_classes: int,
        device: torch.device | str | None = None,
        challenge_window: int = challenge.DEFAULT_WINDOW,
        build: Callable[[TrainConfig], nn.Module] | None = None,
    ) -> None:
        self.configs = list(configs)
        if not self.configs:
            raise ValueError("configs: an array needs at least one configuration")
        for i, config in enumerate(self.configs):
            if not isinstance(config, TrainConfig):
                raise ValueError(f"configs[{i}]: expected a TrainConfig, got {type(config).__name__}")
            config.validate()
        self.device = select_device() if device is None else torch.device(device)
        self.batch_size = self.configs[0].batch_size
        for i, config in enumerate(self.configs):
            if config.batch_size != self.batch_size:
                raise ValueError(f"batch_size: the members of an array share one; configs[0] has {self.batch_size}, "
                                 f"configs[{i}] has {config.batch_size}")
        self.amp_dtype = autocast_dtype(self.configs[0].precision, self.device)
        for i, config in enumerate(self.configs):
            if autocast_dtype(config.precision, self.device) is not self.amp_dtype:
                raise ValueError(f"precision: the members of an array train in one precision; configs[0] "
                                 f"({self.configs[0].precision!r}) and configs[{i}] ({config.precision!r}) differ "
                                 f"on {self.device}")
        if challenge_window < 1:
            raise ValueError(f"challenge_window: must be >= 1, got {challenge_window}")
        self.input_shape = tuple(int(s) for s in input_shape)
        self.num_classes = int(num_classes)
        self.challenge_window = challenge_window
        self.train_x, self.train_y = self._checked("train", train_x, train_y)
        self.test_x, self.test_y = self._checked("test", test_x, test_y)
        flush_denormals(self.device)
        if self.device.type == "cpu":
            keep_freed_memory()

        build = build or (lambda config: build_model(factory_of(config.model), config.model_args, self.input_shape,
                                                     self.num_classes))
        # the stack: the SGD family first, then the Adam family, each in the configs' order
        self._order = sorted(range(len(self.configs)), key=lambda i: _family(self.configs[i]) == "adam")
        models = []
        for i in self._order:
            torch.manual_seed(self.configs[i].seed)  # as Trainer: the seed, then the model
            models.append(build(self.configs[i]).to(self.device))
        self._check_same_structure(models)
        params, buffers = torch.func.stack_module_state(models)
        self.params: dict[str, torch.Tensor] = params
        self.buffers: dict[str, torch.Tensor] = buffers
        # weights live in the stack; the template only lends functional_call its structure
        self._template = copy.deepcopy(models[0]).to("meta")
        self._plan = _mlp_plan(self._template)  # None: a model the batched matmuls do not know, so vmap
        self._names = [name for name, _ in self._template.named_parameters()]
        self._state_keys = list(self._template.state_dict().keys())
        shapes = {name: p.shape[1:] for name, p in self.params.items()}
        sgd = [self.configs[i] for i in self._order if _family(self.configs[i]) == "sgd"]
        adam = [self.configs[i] for i in self._order if _family(self.configs[i]) == "adam"]
        self._sgd = _SgdFamily(sgd, shapes, self.device) if sgd else None
        self._adam = _AdamFamily(adam, shapes, self.device) if adam else None
        self._histories: dict[int, list[dict[str, Any]]] = {i: [] for i in range(len(self.configs))}
        self._stepped = {i: False for i in range(len(self.configs))}  # any optimizer step taken yet
        # bf16: the weights autocast would cast to bf16 at every use (those of Linear and Conv
        # layers) are cast once per step, after the update, into bf16 leaves the passes run on
        self._cast_names = set()
        if self.amp_dtype is not None:
            for prefix, module in self._template.named_modules():
                if isinstance(module, (nn.Linear, nn.modules.conv._ConvNd)):
                    self._cast_names |= {f"{prefix}.{n}" if prefix else n for n, _ in module.named_parameters(
                        recurse=False)}
        self._low: dict[str, torch.Tensor] = {}
        self._refresh_low()
        self._grad_out: dict[str, torch.Tensor] = {}  # weight gradients, written in place each step
        self._grad32: dict[str, torch.Tensor] = {}  # their fp32 form in bf16

    # --- members --------------------------------------------------------------------------------

    @property
    def members(self) -> list[int]:
        """Ids of the members still in the array, in stack order."""
        return list(self._order)

    @property
    def finished(self) -> bool:
        return all(self._member_finished(i) for i in self._order)

    @property
    def precision(self) -> str:
        return precision_label(self.amp_dtype)

    def history(self, member: int) -> list[dict[str, Any]]:
        """The member's metrics so far, one dict per epoch (kept after it leaves)."""
        self._check_id(member)
        return self._histories[member]

    def epochs_done(self, member: int) -> int:
        return len(self.history(member))

    def remove(self, member: int) -> None:
        """Take `member` out of the array (ASHA stopped it, a stall); the others go on unchanged."""
        position = self._position(member)
        self._compact([p for p in range(len(self._order)) if p != position])

    def _member_finished(self, member: int) -> bool:
        history = self._histories[member]
        return len(history) >= self.configs[member].epochs or bool(history and history[-1]["diverged"])

    def _check_id(self, member: int) -> None:
        if not (isinstance(member, int) and 0 <= member < len(self.configs)):
            raise ValueError(f"member: no member {member!r} (ids are 0..{len(self.configs) - 1})")

    def _position(self, member: int) -> int:
        self._check_id(member)
        if member not in self._order:
            raise ValueError(f"member {member}: no longer in the array (it finished, diverged or was removed)")
        return self._order.index(member)

    def _split(self) -> int:
        """Stack positions below this are the SGD family's, the rest the Adam family's."""
        return sum(1 for i in self._order if _family(self.configs[i]) == "sgd")

    def _compact(self, keep: list[int]) -> None:
        """Keep the members at stack positions `keep` (ascending), dropping the others' weights and state."""
        split = self._split()
        index = torch.tensor(keep, dtype=torch.int64, device=self.device)
        with torch.no_grad():
            self.params = {name: p.detach().index_select(0, index).requires_grad_(p.requires_grad)
                           for name, p in self.params.items()}
            self.buffers = {name: b.index_select(0, index) for name, b in self.buffers.items()}
        self._order = [self._order[p] for p in keep]
        self._low = {}
        self._refresh_low()
        for family, positions in ((self._sgd, [p for p in keep if p < split]),
                                  (self._adam, [p - split for p in keep if p >= split])):
            if family is None:
                continue
            local = torch.tensor(positions, dtype=torch.int64, device=self.device)
            family.select(local, [self.configs[i] for i in self._order if _family(self.configs[i]) ==
                                  ("sgd" if family is self._sgd else "adam")])

    # --- training -------------------------------------------------------------------------------

    def run(self) -> Iterator[dict[int, dict[str, Any]]]:
        """Train until every member has finished, yielding each epoch's {member id: metrics}."""
        while not self.finished:
            yield self.run_epoch()

    def run_epoch(self) -> dict[int, dict[str, Any]]:
        """One epoch of every member still in the array: {member id: the Trainer's metrics}."""
        done = [p for p, i in enumerate(self._order) if self._member_finished(i)]
        if done:  # members whose last epoch was reported leave now, their final state saved or not
            self._compact([p for p in range(len(self._order)) if p not in done])
        if not self._order:
            return {}
        start = time.perf_counter()
        epochs = {i: len(self._histories[i]) + 1 for i in self._order}
        self._set_lrs(epochs)
        for i in self._order:
            self._stepped[i] = True  # every member takes at least one step this epoch
        results, train = self._train_epoch(epochs, start)
        train_seconds = time.perf_counter() - start
        for member, (loss, accuracy, se) in zip(self._order, self._evaluate() if self._order else []):
            train_loss, train_accuracy = train[member]
            results[member] = self._record(member, epochs[member], train_loss, train_accuracy, loss, accuracy, se,
                                           time.perf_counter() - start, train_seconds)
        diverged = [p for p, i in enumerate(self._order) if results[i]["diverged"]]
        if diverged:
            self._compact([p for p in range(len(self._order)) if p not in diverged])
        return {i: results[i] for i in sorted(results)}

    def _set_lrs(self, epochs: Mapping[int, int]) -> None:
        lrs = [epoch_lr(self.configs[i], epochs[i]) for i in self._order]
        split = self._split()
        if self._sgd is not None:
            self._sgd.set_lr(lrs[:split])
        if self._adam is not None:
            self._adam.set_lr(lrs[split:])

    @torch.no_grad()
    def _refresh_low(self) -> None:
        """bf16 copies of the weights autocast casts, in their layout (no-op in fp32).

        Under vmap, autocast's own casts of the stacked weights cost as much as the bf16 GEMMs
        saved (K=16 on the 2-core Xeon: 231 ms a step against 240 in fp32; 116 ms with bf16
        leaves). Casting once after each update computes exactly what autocast computes: it
        would cast these same fp32 weights to bf16 at their use, and turn their bf16 gradients
        back to fp32, as `_train_epoch` does."""
        for name in self._cast_names:
            weight, low = self.params[name].detach(), self._low.get(name)
            if low is None:
                # contiguous, as a model's own weights are: oneDNN's bf16 GEMMs round differently
                # when a weight comes transposed (the fp32 masters follow their gradients' layout)
                self._low[name] = weight.to(self.amp_dtype, memory_format=torch.contiguous_format).requires_grad_()
            else:
                low.copy_(weight)

    def _fp32(self, name: str, grad: torch.Tensor) -> torch.Tensor:
        if grad.dtype == torch.float32:
            return grad
        if not grad.is_contiguous():
            return grad.float()
        return self._buffer(self._grad32, name, grad, torch.float32).copy_(grad)

    def _leaves(self) -> dict[str, torch.Tensor]:
        """The tensors the passes run on: the bf16 copies where there are, else the fp32 weights."""
        return {name: self._low.get(name, p) for name, p in self.params.items()}

    def _forward(self, x: torch.Tensor, shared: bool, params: Mapping[str, torch.Tensor],
                 buffers: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Logits (K, B, classes) of every member: x is (K, B, ...) or, shared, (B, ...)."""
        if self._plan is not None:
            return self._forward_mlp(x, shared, params)

        def one(p: dict[str, torch.Tensor], b: dict[str, torch.Tensor], xi: torch.Tensor) -> torch.Tensor:
            return torch.func.functional_call(self._template, (p, b), (xi,))

        return torch.vmap(one, in_dims=(0, 0, None if shared else 0))(params, buffers, x)

    @staticmethod
    def _buffer(buffers: dict[str, torch.Tensor], name: str, like: torch.Tensor,
                dtype: torch.dtype | None = None) -> torch.Tensor:
        """A tensor shaped like `like` kept in `buffers` between steps (made again when K changes)."""
        buffer = buffers.get(name)
        dtype = dtype or like.dtype
        if buffer is None or buffer.shape != like.shape or buffer.dtype != dtype:
            buffer = buffers[name] = torch.empty(like.shape, dtype=dtype, device=like.device)
        return buffer

    def _forward_mlp(self, x: torch.Tensor, shared: bool, params: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The MLP as one batched matmul per layer (`_BatchedLinear`): on a CPU each member's
        logits and gradients come out bit for bit those of its own model, in fp32 and in bf16
        (vmap's linear adds the bias after the matmul, in fp32 under autocast, and returns the
        weight gradients transposed). A shared batch is expanded (stride 0), not copied."""
        h = x
        k = next(iter(params.values())).shape[0]
        for kind, weight, bias in self._plan:
            if kind == "flatten":
                h = h.flatten(1) if shared else h.flatten(2)
            elif kind == "relu":
                h = h.relu()
            else:
                if h.dim() == 2:  # the shared batch, the same for every member
                    h = h.expand(k, *h.shape)
                w = params[weight]
                out = None
                if w.requires_grad and torch.is_grad_enabled():
                    out = self._buffer(self._grad_out, weight, w)
                h = _BatchedLinear.apply(h, w, None if bias is None else params[bias], out)
        return h

    def _train_epoch(self, epochs: Mapping[int, int],
                     start: float) -> tuple[dict[int, dict[str, Any]], dict[int, tuple[float, float]]]:
        """Train one epoch; returns (metrics of members that diverged and left mid-epoch,
        {member still here: (train loss, train accuracy)})."""
        n, batch_size = self.train_y.shape[0], self.batch_size
        keys = [(self.configs[i].seed, epochs[i]) for i in self._order]
        shared = len(set(keys)) == 1  # one permutation for all: gather each batch once
        orders = torch.stack([
            torch.randperm(n, generator=torch.Generator().manual_seed(epoch_seed(seed, epoch)))
            for seed, epoch in (keys[:1] if shared else keys)
        ]).to(self.device)
        k = len(self._order)
        loss_sum = torch.zeros(k, device=self.device)
        correct = torch.zeros(k, device=self.device, dtype=torch.int64)
        left: dict[int, dict[str, Any]] = {}
        self._template.train()
        for step, first in enumerate(range(0, n, batch_size), start=1):
            k = len(self._order)
            idx = orders[:, first:first + batch_size]
            b = idx.shape[1]
            if shared:
                x = _unit(self.train_x.index_select(0, idx[0]), self.amp_dtype)
                y = self.train_y.index_select(0, idx[0])
                targets = y.repeat(k)
            else:
                flat = idx.reshape(-1)
                x = _unit(self.train_x.index_select(0, flat), self.amp_dtype).view(k, b, *self.train_x.shape[1:])
                y = self.train_y.index_select(0, flat).view(k, b)
                targets = y.reshape(-1)
            leaves = self._leaves()
            with autocast(self.device, self.amp_dtype):
                logits = self._forward(x, shared, leaves, self.buffers)
                losses = F.cross_entropy(logits.float().flatten(0, 1), targets, reduction="none").view(k, b).mean(1)
            grads = torch.autograd.grad(losses.sum(), list(leaves.values()), allow_unused=True)
            # fp32 gradients the step may overwrite (bf16 ones converted as autocast's cast-back does)
            self._step({name: None if g is None else self._fp32(name, g) for name, g in zip(leaves, grads)})
            loss_sum += losses.detach() * b
            correct += (logits.detach().argmax(-1) == y).sum(-1)
            if step % DIVERGENCE_CHECK_STEPS == 0 and not torch.isfinite(loss_sum).all().item():
                # one sync for all members, as often as the Trainer's; the diverged leave now
                bad = [p for p, finite in enumerate(torch.isfinite(loss_sum).tolist()) if not finite]
                train_seconds = time.perf_counter() - start
                evaluated = self._evaluate(bad)
                counts = correct.tolist()
                for p, (loss, accuracy, se) in zip(bad, evaluated):
                    member = self._order[p]
                    left[member] = self._record(member, epochs[member], math.nan, counts[p] / n, loss, accuracy, se,
                                                time.perf_counter() - start, train_seconds)
                keep = [p for p in range(k) if p not in bad]
                self._compact(keep)
                if not self._order:
                    return left, {}
                index = torch.tensor(keep, dtype=torch.int64, device=self.device)
                loss_sum, correct = loss_sum.index_select(0, index), correct.index_select(0, index)
                if not shared:
                    orders = orders.index_select(0, index)
        losses_, counts = loss_sum.tolist(), correct.tolist()
        return left, {i: (losses_[p] / n, counts[p] / n) for p, i in enumerate(self._order)}

    @torch.no_grad()
    def _step(self, grads: Mapping[str, torch.Tensor | None]) -> None:
        """One optimizer step for every member; parameters without a gradient are skipped, as torch does."""
        split = self._split()
        names = [name for name, g in grads.items() if g is not None]
        for name in names:  # the weights follow their gradients' memory layout (once; again after a compaction)
            p = self.params[name]
            if p.stride() != grads[name].stride():
                self.params[name] = _same_layout(p.detach(), grads[name]).requires_grad_(p.requires_grad)
        for family, part in ((self._sgd, slice(0, split)), (self._adam, slice(split, None))):
            if family is None or part.start == part.stop:
                continue
            # slices of the stacked tensors: views, updated in place
            family.step({n: self.params[n].detach()[part] for n in names}, {n: grads[n][part] for n in names})
        self._refresh_low()

    @torch.no_grad()
    def _evaluate(self, positions: Sequence[int] | None = None) -> list[tuple[float, float, float]]:
        """(mean loss, accuracy, standard error of the loss) on the test split for the members at
        stack `positions` (all when None), batched over members, as loops.evaluate computes them."""
        params, buffers = self._leaves(), self.buffers
        if positions is not None:
            index = torch.tensor(list(positions), dtype=torch.int64, device=self.device)
            params = {name: p.detach().index_select(0, index) for name, p in params.items()}
            buffers = {name: b.index_select(0, index) for name, b in buffers.items()}
        k = next(iter(params.values())).shape[0]
        n = self.test_y.shape[0]
        loss_sum = torch.zeros(k, device=self.device, dtype=torch.float64)
        square_sum = torch.zeros(k, device=self.device, dtype=torch.float64)
        correct = torch.zeros(k, device=self.device, dtype=torch.int64)
        self._template.eval()
        for first in range(0, n, EVAL_BATCH):
            x = _unit(self.test_x[first:first + EVAL_BATCH], self.amp_dtype)
            y = self.test_y[first:first + EVAL_BATCH]
            with autocast(self.device, self.amp_dtype):
                logits = self._forward(x, True, params, buffers)
            losses = F.cross_entropy(logits.float().flatten(0, 1), y.repeat(k), reduction="none")
            losses = losses.view(k, -1).double()
            loss_sum += losses.sum(1)
            square_sum += losses.square().sum(1)
            correct += (logits.argmax(-1) == y).sum(-1)
        out = []
        for total, squares, right in zip(loss_sum.tolist(), square_sum.tolist(), correct.tolist()):
            mean = total / n
            variance = max(squares / n - mean * mean, 0.0) * n / max(n - 1, 1)
            out.append((mean, right / n, math.sqrt(variance / n)))
        return out

    def _record(self, member: int, epoch: int, train_loss: float, train_accuracy: float, test_loss: float,
                test_accuracy: float, test_loss_se: float, seconds: float, train_seconds: float) -> dict[str, Any]:
        """The Trainer's metrics dict for one member's epoch, appended to its history."""
        history = self._histories[member]
        # epoch_seconds: the array's wall time, shared by its members; samples_per_second: this member's images
        metrics = epoch_metrics(epoch, train_loss=train_loss, train_accuracy=train_accuracy, test_loss=test_loss,
                                test_accuracy=test_accuracy, test_loss_se=test_loss_se, test_size=self.test_y.shape[0],
                                epoch_seconds=seconds, samples_per_second=self.train_y.shape[0] / train_seconds,
                                history=history, window=self.challenge_window, classes=self.num_classes)
        history.append(metrics)
        return metrics

    # --- state ----------------------------------------------------------------------------------

    def member_state_dict(self, member: int) -> dict[str, Any]:
        """Member `member`'s checkpoint in `Trainer.state_dict()`'s format: a plain Trainer of the
        same config resumes it with `load_state_dict`."""
        position = self._position(member)
        config = self.configs[member]
        model = self._template.state_dict()  # keeps torch's _metadata; the values are replaced
        for key in self._state_keys:
            source = self.params[key] if key in self.params else self.buffers[key]
            model[key] = source[position].detach().clone(memory_format=torch.contiguous_format)
        family, local = self._family_of(position)
        dummies = [torch.empty(0, device=self.device, requires_grad=True) for _ in self._names]
        optimizer = make_optimizer(config, dummies, self.device)
        done = len(self._histories[member])
        optimizer.param_groups[0]["lr"] = epoch_lr(config, done) if done else config.lr  # as the Trainer leaves it
        for name, dummy in zip(self._names, dummies):
            entry = family.export(local, name, config, self._stepped[member])
            if entry:
                optimizer.state[dummy] = entry
        return {"model": model, "optimizer": optimizer.state_dict(),
                "history": [dict(m) for m in self._histories[member]]}

    def load_member_state(self, member: int, state: Mapping[str, Any]) -> None:
        """Start `member` from a checkpoint of `Trainer.state_dict()` (or `member_state_dict`) of
        the same config: weights, optimizer state and history; its next epoch is the one after."""
        position = self._position(member)
        config = self.configs[member]
        model = state["model"]
        missing = [k for k in self._state_keys if k not in model]
        unexpected = [k for k in model if k not in self._state_keys]
        if missing or unexpected:
            raise ValueError(f"member {member}: the checkpoint's model does not fit (missing {missing}, "
                             f"unexpected {unexpected})")
        optimizer = state["optimizer"]
        groups = optimizer["param_groups"]
        if len(groups) != 1 or len(groups[0]["params"]) != len(self._names):
            raise ValueError(f"member {member}: the checkpoint's optimizer has another parameter layout")
        self._check_group(member, config, groups[0])
        with torch.no_grad():
            for key in self._state_keys:
                target = self.params[key] if key in self.params else self.buffers[key]
                if tuple(model[key].shape) != tuple(target.shape[1:]):
                    raise ValueError(f"member {member}: {key} has shape {tuple(model[key].shape)} in the checkpoint, "
                                     f"{tuple(target.shape[1:])} here")
                target.detach()[position].copy_(model[key])
            family, local = self._family_of(position)
            stepped = False
            for name, index in zip(self._names, groups[0]["params"]):
                entry = optimizer["state"].get(index, optimizer["state"].get(str(index), {}))
                stepped |= family.load(local, name, entry)
        self._refresh_low()
        self._histories[member] = [dict(m) for m in state["history"]]
        self._stepped[member] = stepped or bool(self._histories[member])

    def _family_of(self, position: int) -> tuple[_SgdFamily | _AdamFamily, int]:
        split = self._split()
        if position < split:
            assert self._sgd is not None
            return self._sgd, position
        assert self._adam is not None
        return self._adam, position - split

    @staticmethod
    def _check_group(member: int, config: TrainConfig, group: Mapping[str, Any]) -> None:
        """The checkpoint's optimizer must be this config's: torch's load_state_dict would
        otherwise silently take the checkpoint's hyperparameters."""
        adam = "betas" in group
        if adam != (config.optimizer in ADAM_FAMILY):
            raise ValueError(f"member {member}: optimizer is {config.optimizer!r} but the checkpoint's is "
                             f"{'Adam' if adam else 'SGD'}-like")
        expected: dict[str, Any] = {"weight_decay": config.weight_decay}
        if adam:
            if "decoupled_weight_decay" in group:
                expected["decoupled_weight_decay"] = config.optimizer == "adamw"
        else:
            expected.update(momentum=config.momentum, nesterov=config.optimizer == "nesterov")
        for key, value in expected.items():
            if group.get(key) != value:
                raise ValueError(f"member {member}: {key} is {value!r} in its config, {group.get(key)!r} in the "
                                 f"checkpoint")

    # --- input checks ---------------------------------------------------------------------------

    def _checked(self, split: str, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor):
            raise ValueError(f"{split}_x, {split}_y: expected tensors, got {type(x).__name__}, {type(y).__name__}")
        if tuple(x.shape[1:]) != self.input_shape:
            raise ValueError(f"{split}_x: images of shape {tuple(x.shape[1:])}, input_shape is {self.input_shape}")
        if x.dtype != torch.uint8 and not x.is_floating_point():
            raise ValueError(f"{split}_x: expected uint8 pixels or floats, got {x.dtype}")
        if y.dtype != torch.int64 or y.dim() != 1:
            raise ValueError(f"{split}_y: expected a 1-d int64 tensor of labels, got {y.dtype} {tuple(y.shape)}")
        if x.shape[0] != y.shape[0] or x.shape[0] == 0:
            raise ValueError(f"{split}_x, {split}_y: {x.shape[0]} images and {y.shape[0]} labels")
        low, high = int(y.min()), int(y.max())
        if low < 0 or high >= self.num_classes:
            raise ValueError(f"{split}_y: labels {low}..{high} outside 0..{self.num_classes - 1} (num_classes)")
        return x.to(self.device), y.to(self.device)

    def _check_same_structure(self, models: Sequence[nn.Module]) -> None:
        reference = {name: p.shape for name, p in models[0].named_parameters()}
        for model, i in zip(models[1:], self._order[1:]):
            shapes = {name: p.shape for name, p in model.named_parameters()}
            if shapes != reference:
                raise ValueError(f"model_args: configs[{i}] builds a model shaped unlike configs[{self._order[0]}]'s "
                                 f"({self.configs[i].model_args} vs {self.configs[self._order[0]].model_args}); "
                                 f"the members of an array share one architecture")
