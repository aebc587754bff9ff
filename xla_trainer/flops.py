"""FLOPs of the real model (fvcore, or an objective's own count) and the peak of the device, for
throughput and MFU."""
import re

import torch
from fvcore.nn import FlopCountAnalysis
from fvcore.nn.jit_handles import get_shape

# Dense bf16 peak per chip / GPU, TFLOP/s, from the vendors' spec sheets.
PEAK_TFLOPS = (
    (r"v6e|v6 lite|trillium", 918.0),
    (r"v5p", 459.0),
    (r"v5e|v5lite|v5 lite", 197.0),
    (r"v4", 275.0),
    (r"H200", 989.0),
    (r"H100", 989.0),
    (r"A100", 312.0),
)


def peak_flops(device_kind: str) -> float | None:
    for pattern, tflops in PEAK_TFLOPS:
        if re.search(pattern, device_kind, re.IGNORECASE):
            return tflops * 1e12
    return None


def _sdpa_macs(inputs, outputs):
    # fvcore skips aten::scaled_dot_product_attention: QK^T and AV are each B*H*L*S*d MACs.
    q, k = get_shape(inputs[0]), get_shape(inputs[1])
    *batch, length, dim = q
    n = 1
    for b in batch:
        n *= b
    return 2 * n * length * k[-2] * dim


def _fused_mha_macs(inputs, outputs):
    # nn.MultiheadAttention's eval fast path (OpenCLIP's towers) is one op fvcore skips whole:
    # q and output projections over L queries, k and v over S keys, QK^T and AV.
    batch, length, dim = get_shape(inputs[0])
    keys = get_shape(inputs[1])[1]
    return batch * (2 * length * dim * dim + 2 * keys * dim * dim + 2 * length * keys * dim)


def forward_flops(module: torch.nn.Module, *inputs) -> float:
    """FLOPs (2 per multiply-add) of one forward of `module` on `inputs`."""
    analysis = FlopCountAnalysis(module, inputs)
    analysis.set_op_handle("aten::scaled_dot_product_attention", _sdpa_macs)
    analysis.set_op_handle("aten::_native_multi_head_attention", _fused_mha_macs)
    analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
    return 2.0 * analysis.total()


class _LossOnly(torch.nn.Module):
    """An objective's loss as a function of tensors (fvcore traces positional tensors)."""

    def __init__(self, method, keys):
        super().__init__()
        self.method, self.keys = method, keys

    def forward(self, *tensors):
        *values, noise = tensors if self.method.noise_shape is not None else (*tensors, None)
        return self.method(dict(zip(self.keys, values)), noise)["loss"]


def objective_flops(method: torch.nn.Module, batch: dict) -> float:
    """Forward FLOPs of an objective on `batch`: its own analytic count where fvcore cannot count
    (a method `forward_flops(batch)`, e.g. for a scan), else fvcore's."""
    if hasattr(method, "forward_flops"):
        return float(method.forward_flops(batch))
    inputs = tuple(batch.values())
    if method.noise_shape is not None:
        inputs += (torch.rand(len(batch["images"]), *method.noise_shape),)
    return forward_flops(_LossOnly(method, list(batch)), *inputs)


def train_flops_per_image(method: torch.nn.Module, teacher: torch.nn.Module | None, batch: dict) -> dict:
    """Counted on one CPU image (`batch`, targets included) before the model moves to its device.
    Backward = 2 x forward; the teacher (None when its targets are precomputed) runs forward only."""
    with torch.no_grad():
        student = objective_flops(method, batch)
        teacher_fwd = forward_flops(teacher, batch["images"]) if teacher is not None else 0.0
    return step_flops(student, teacher_fwd)


def step_flops(student_forward: float, teacher_forward: float = 0.0) -> dict:
    """A train step's FLOPs per image from its forwards: backward = 2 x the student's forward."""
    return {"student_forward": student_forward, "teacher_forward": teacher_forward,
            "train_step": 3 * student_forward + teacher_forward}
