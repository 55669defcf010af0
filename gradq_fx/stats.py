"""Per-layer gradient quantization statistics, and the adaptive learning rate built on them.

With `GradQConfig.stats` (off by default), every quantized Linear (or convolution) weight
carries a probe: a [3] parameter that gradq's backward fills with [cos(g, g_q),
||g - g_q||^2 / ||g||^2, 1] for the output gradient g as its wgrad GEMM quantizes it. The
statistics arrive as the probe's `.grad`, on the device, summed over backward passes: reading
them needs no host sync.

    model = torch.compile(model, backend="gradq")
    optimizer = torch.optim.AdamW(gradq_fx.stats.param_groups(model), lr=1e-3)
    adaptive = gradq_fx.stats.AdaptiveLR(optimizer)
    for x, y in data:
        optimizer.zero_grad()
        loss_fn(model(x), y).backward()
        adaptive.step()       # optimizer.step() with per-layer lr from this step's statistics
        scheduler.step()      # optional: it sees and sets the unscaled lr
"""

from __future__ import annotations

import dataclasses
import math

import torch

# The attribute of a weight Parameter that holds its probe (set by gradq's rewrite).
PROBE_ATTRIBUTE = "gradq_stats_probe"
_IS_PROBE = "gradq_is_probe"  # set on each probe
# A probe's sums stop growing past this many backward passes: older ones are scaled down,
# so that a loop that never resets them (nothing reads them) accumulates nothing unbounded.
WINDOW = 1024


def new_probe(parameter: torch.nn.Parameter) -> torch.nn.Parameter:
    """The statistics probe of a weight: made once, hung on the weight (`PROBE_ATTRIBUTE`)."""
    probe = getattr(parameter, PROBE_ATTRIBUTE, None)
    if probe is None:
        probe = torch.nn.Parameter(torch.zeros(3, device=parameter.device))
        probe.register_post_accumulate_grad_hook(_bound)
        setattr(probe, _IS_PROBE, True)
        setattr(parameter, PROBE_ATTRIBUTE, probe)
    return probe


def _bound(probe: torch.Tensor) -> None:
    """Past WINDOW passes, scale the sums so the count stays at WINDOW (on the device, no sync):
    the means become running means with weight 1 / (WINDOW + 1) for the newest pass."""
    with torch.no_grad():
        probe.grad.mul_((WINDOW / probe.grad[2]).clamp(max=1.0))


@dataclasses.dataclass(frozen=True)
class LayerStats:
    """Means over the backward passes since the last reset (0-d tensors on the device)."""

    cosine: torch.Tensor
    relative_error: torch.Tensor
    steps: torch.Tensor


def is_probe(tensor: torch.Tensor) -> bool:
    """Whether `tensor` is a statistics probe (its gradient holds statistics, not a weight's)."""
    return getattr(tensor, _IS_PROBE, False)


def probe_of(parameter: torch.nn.Parameter) -> torch.nn.Parameter | None:
    return getattr(parameter, PROBE_ATTRIBUTE, None)


def stats(model: torch.nn.Module) -> dict[str, LayerStats]:
    """The latest statistics of each quantized layer, by module path (after a backward)."""
    out = {}
    for name, parameter in model.named_parameters():
        probe = probe_of(parameter)
        if probe is None or probe.grad is None:
            continue
        total = probe.grad
        steps = total[2].clamp_min(1.0)
        module = name.removeprefix("_orig_mod.").removesuffix(".weight")
        out[module] = LayerStats(total[0] / steps, total[1] / steps, total[2])
    return out


def reset_stats(model: torch.nn.Module) -> None:
    for parameter in model.parameters():
        probe = probe_of(parameter)
        if probe is not None:
            probe.grad = None


# The modules whose weight gradq's rewrite may quantize, and so give a probe: Linears, and
# the 2-D convolutions of groups 1 and dilation 1 (GEMMs and implicit GEMMs).
LAYER_TYPES = (torch.nn.Linear, torch.nn.Conv2d)


def param_groups(model: torch.nn.Module) -> list[dict]:
    """One optimizer parameter group per nn.Linear and nn.Conv2d (weight and bias), one for
    the rest.

    AdaptiveLR gives each group holding a quantized weight its own learning rate.
    """
    groups, seen = [], set()
    for module in model.modules():
        if isinstance(module, LAYER_TYPES):
            params = [p for p in module.parameters(recurse=False) if p.requires_grad]
            groups.append({"params": params})
            seen.update(id(p) for p in params)
    rest = [p for p in model.parameters() if p.requires_grad and id(p) not in seen]
    return [g for g in groups if g["params"]] + ([{"params": rest}] if rest else [])


class AdaptiveLR:
    """Scales each quantized layer's learning rate by max(exp(-alpha * d), floor).

    d = 1 - cos(g, g_q) is the cosine distance of the layer's quantized gradient (the rule of
    Zhu et al., CVPR 2020, GradQ-ViT's default here: alpha = 20, floor 0.1), from the layer's
    statistics (`GradQConfig.stats`). It hooks the optimizer's own step, so `optimizer.step()`,
    `scaler.step(optimizer)` (which skips the step, and so the scaling, after an fp16
    overflow) and `adaptive.step()` all apply it. A step whose statistics are not finite (an
    overflowing step that still stepped) keeps the layer's last finite factor, 1 at first.

    The factor is computed on the device and the group's lr is a 0-d tensor during the step,
    so a step synchronises nothing itself; optimizers take tensor learning rates (on CUDA,
    torch's foreach AdamW may read one on the host: prefer fused=True there).
    """

    def __init__(self, optimizer: torch.optim.Optimizer, alpha: float = 20.0, floor: float = 0.1):
        if not (isinstance(alpha, (int, float)) and alpha >= 0 and math.isfinite(alpha)):
            raise ValueError(f"alpha must be a finite number >= 0, got {alpha!r}")
        if not (isinstance(floor, (int, float)) and 0 < floor <= 1):
            raise ValueError(f"floor must be in (0, 1], got {floor!r}")
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise ValueError(f"optimizer must be a torch.optim.Optimizer, got {optimizer!r}")
        self.optimizer, self.alpha, self.floor = optimizer, float(alpha), float(floor)
        self.factors: dict[int, torch.Tensor] = {}  # group index -> the last factor applied
        self._scaled: list[tuple[dict, object]] = []
        self._checked = False
        self._hooks = (
            optimizer.register_step_pre_hook(lambda *_: self._scale()),
            optimizer.register_step_post_hook(lambda *_: self._restore()),
        )

    def remove(self) -> None:
        """Unhook from the optimizer: its steps use the groups' own learning rates again."""
        for hook in self._hooks:
            hook.remove()

    def _probe(self, group: dict) -> torch.nn.Parameter | None:
        probes = [probe for p in group["params"] if (probe := probe_of(p)) is not None]
        if len(probes) > 1:
            raise ValueError(
                "AdaptiveLR needs each quantized layer in its own parameter group; build the "
                "optimizer from gradq_fx.stats.param_groups(model)"
            )
        return probes[0] if probes else None

    def factor(self, cosine: torch.Tensor) -> torch.Tensor:
        return torch.exp(-self.alpha * (1.0 - cosine)).clamp_min(self.floor)

    def step(self, closure=None):
        """optimizer.step() (the hooks scale and restore the learning rates)."""
        return self.optimizer.step(closure)

    def _scale(self) -> None:
        """Before a step: each quantized group's lr times its factor; the statistics reset."""
        groups = [(index, g, self._probe(g)) for index, g in enumerate(self.optimizer.param_groups)]
        if not self._checked:
            self._checked = True
            if not any(probe is not None for _, _, probe in groups):
                raise ValueError(
                    "AdaptiveLR: no parameter of the optimizer carries gradq's statistics; "
                    "compile the model with options={'stats': True} and build the optimizer "
                    "from gradq_fx.param_groups(model) after the first forward"
                )
        for index, group, probe in groups:
            if probe is None or probe.grad is None:
                continue
            total = probe.grad
            fresh = self.factor(total[0] / total[2].clamp_min(1.0))
            last = self.factors.get(index)
            last = torch.ones_like(fresh) if last is None else last
            factor = torch.where(torch.isfinite(fresh), fresh, last)
            self._scaled.append((group, group["lr"]))
            group["lr"] = factor * group["lr"]
            self.factors[index] = factor
            probe.grad = None

    def _restore(self) -> None:
        """After a step: the groups' own learning rates back, so schedulers never see the
        scaled ones."""
        for group, lr in self._scaled:
            group["lr"] = lr
        self._scaled = []
