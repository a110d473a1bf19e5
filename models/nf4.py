"""NF4Linear: a frozen 4-bit (NF4, double quant) linear layer, interchangeable with bitsandbytes.

Its state dict uses bitsandbytes' `Linear4bit` keys, so bnb-format checkpoints load into it and
its state dict loads into bnb:

    weight                                  packed codes, uint8 (ceil(out*in/2), 1)
    bias                                    optional, in its own dtype
    weight.absmax                           uint8 codes of the per-64 absmax
    weight.quant_map                        the 16 NF4 values, fp32
    weight.nested_absmax                    fp32, one per 256 absmax
    weight.nested_quant_map                 the 256-entry dynamic map, fp32
    weight.quant_state.bitsandbytes__nf4    uint8 bytes of a JSON dict: quant_type, blocksize, dtype,
                                            shape, nested_blocksize, nested_dtype, nested_offset

Streaming load: build the model on the meta device, `replace_linears_with_nf4(model)`, then fill
each NF4Linear as its weight is read, with `quantize_(w)` (a full-precision weight) or
`load_quantized_(tensors)` (bnb-format tensors); the bf16 model never sits in memory whole.
"""
from __future__ import annotations

import json

import torch
from torch import nn

from engine.errors import EngineError
from kernels.nf4 import BLOCKSIZE, NESTED_BLOCKSIZE, NF4Tensor, dynamic_map, nf4_code, nf4_matmul, quantize_nf4

QUANT_STATE_KEY = "quant_state.bitsandbytes__nf4"
_TENSOR_KEYS = ("absmax", "quant_map", "nested_absmax", "nested_quant_map")
_STATS = ("absmax", "quant_map", "nested_absmax", "nested_quant_map", "offset")  # buffers beside `weight`


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


class NF4Linear(nn.Module):
    """y = x W^T + b with W (out, in) frozen in NF4; only the input gets a gradient.

    compute_dtype: the dtype x is cast to for the matmul (None: x's own); the output comes back in
    x's dtype. weight_dtype: the dtype W had before quantization (recorded in the state dict).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *,
                 compute_dtype: torch.dtype | None = None, device=None, dtype: torch.dtype | None = None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.compute_dtype = compute_dtype
        self.weight_dtype = dtype or torch.get_default_dtype()
        n = in_features * out_features
        blocks = -(-n // BLOCKSIZE)
        # Buffers hold W = 0 until filled (meta tensors when device="meta": nothing is allocated).
        self.register_buffer("weight", torch.full(((n + 1) // 2, 1), 0x77, dtype=torch.uint8, device=device))
        self.register_buffer("absmax", torch.zeros(blocks, dtype=torch.uint8, device=device))
        self.register_buffer("quant_map", nf4_code("cpu").to(device))
        self.register_buffer("nested_absmax", torch.zeros(-(-blocks // NESTED_BLOCKSIZE), device=device))
        self.register_buffer("nested_quant_map", dynamic_map("cpu").to(device))
        self.register_buffer("offset", torch.zeros((), device=device))
        self.register_parameter("bias", nn.Parameter(
            torch.zeros(out_features, dtype=self.weight_dtype, device=device), requires_grad=False) if bias else None)

    @classmethod
    def from_linear(cls, linear: nn.Linear, compute_dtype: torch.dtype | None = None) -> "NF4Linear":
        """Quantize an nn.Linear on its own device; the bias is shared, not copied."""
        m = cls(linear.in_features, linear.out_features, bias=False, compute_dtype=compute_dtype,
                device="meta", dtype=linear.weight.dtype)
        m.quantize_(linear.weight)
        if linear.bias is not None:
            m.bias = nn.Parameter(linear.bias.detach(), requires_grad=False)
        return m

    @property
    def nf4(self) -> NF4Tensor:
        """The weight as an NF4Tensor (views of this module's buffers)."""
        return NF4Tensor(self.weight.view(-1), self.absmax, self.nested_absmax, self.nested_quant_map,
                         self.offset, self.quant_map, torch.Size((self.out_features, self.in_features)),
                         self.weight_dtype)

    @torch.no_grad()
    def quantize_(self, w: torch.Tensor) -> "NF4Linear":
        """Fill the buffers from a full-precision weight (out, in); they move to w's device."""
        expected = (self.out_features, self.in_features)
        if tuple(w.shape) != expected:
            raise EngineError(f"NF4Linear.quantize_: weight has shape {tuple(w.shape)}, this layer "
                              f"expects {expected} (out_features, in_features); check the checkpoint "
                              "matches the model config")
        q = quantize_nf4(w)
        self.weight = q.packed.view(-1, 1)
        self.absmax, self.nested_absmax, self.offset = q.absmax, q.absmax2, q.offset
        self.quant_map, self.nested_quant_map = q.qmap, q.code2
        self.weight_dtype = w.dtype
        return self

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """W as a dense (out, in) tensor in `dtype` (default: compute_dtype, else weight_dtype)."""
        return self.nf4.dequantize(dtype or self.compute_dtype or self.weight_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = self.compute_dtype or x.dtype
        y = nf4_matmul(x.to(dtype), self.nf4)
        if self.bias is not None:
            y = y + self.bias.to(dtype)
        return y.to(x.dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, nf4, compute_dtype={self.compute_dtype}")

    # ---- device and dtype moves: the packed codes and fp32 statistics never change dtype ----

    def _apply(self, fn, recurse=True):
        stats = {name: self._buffers.pop(name) for name in _STATS}
        try:
            super()._apply(fn, recurse)  # moves `weight` (uint8: device only) and the bias
        finally:
            for name, t in stats.items():
                self._buffers[name] = t
        device = self.weight.device
        for name in _STATS:  # meta statistics (an unloaded layer) follow fn, e.g. to_empty()
            t = self._buffers[name]
            self._buffers[name] = fn(t) if t.is_meta and device.type != "meta" else t.to(device)
        return self

    # ---- bitsandbytes-format state dict ----

    def quant_state_dict(self) -> dict[str, torch.Tensor]:
        """The tensors bnb stores beside `weight` (keys without the `weight.` prefix)."""
        if self.offset.is_meta:
            raise EngineError("NF4Linear has no weights yet (meta device): load or quantize it first")
        state = {
            "quant_type": "nf4",
            "blocksize": BLOCKSIZE,
            "dtype": _dtype_name(self.weight_dtype),
            "shape": [self.out_features, self.in_features],
            "nested_blocksize": NESTED_BLOCKSIZE,
            "nested_dtype": _dtype_name(self.nested_absmax.dtype),
            "nested_offset": self.offset.item(),
        }
        packed = torch.tensor(list(json.dumps(state).encode("utf-8")), dtype=torch.uint8)
        return {"absmax": self.absmax, "quant_map": self.quant_map, "nested_absmax": self.nested_absmax,
                "nested_quant_map": self.nested_quant_map, QUANT_STATE_KEY: packed}

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        destination[prefix + "weight"] = self.weight
        if self.bias is not None:
            destination[prefix + "bias"] = self.bias if keep_vars else self.bias.detach()
        for key, t in self.quant_state_dict().items():
            destination[prefix + "weight." + key] = t

    @torch.no_grad()
    def load_quantized_(self, tensors: dict[str, torch.Tensor], where: str = "") -> "NF4Linear":
        """Fill from bnb-format tensors: `weight`, `weight.absmax`, ... `weight.quant_state.*`
        (keys without the module prefix; `bias` optional). Tensors stay on their device unless
        this module already lives on a real device, where they are moved to it."""
        where = where or "NF4 weight"
        if "weight." + QUANT_STATE_KEY not in tensors:
            found = [k for k in tensors if k.startswith("weight.quant_state.")]
            hint = (f"found {found[0]!r}: only NF4 is supported, re-quantize with quant_type='nf4'"
                    if found else "is this a bitsandbytes 4-bit checkpoint?")
            raise EngineError(f"{where}: missing 'weight.{QUANT_STATE_KEY}'; {hint}")
        state = json.loads(bytes(tensors["weight." + QUANT_STATE_KEY].cpu().tolist()).decode("utf-8"))
        if "nested_absmax" not in state and "weight.nested_absmax" not in tensors:
            raise EngineError(f"{where}: no 'weight.nested_absmax': only double-quantized NF4 is supported; "
                              "re-quantize with compress_statistics=True (bnb_4bit_use_double_quant=True)")
        expected = [self.out_features, self.in_features]
        checks = [("quant_type", "nf4"), ("blocksize", BLOCKSIZE), ("nested_blocksize", NESTED_BLOCKSIZE),
                  ("shape", expected)]
        for key, want in checks:
            got = list(state.get(key) or []) if key == "shape" else state.get(key)
            if got != want:
                raise EngineError(f"{where}: quant_state {key} is {state.get(key)!r}, this layer needs "
                                  f"{want!r}; re-quantize the checkpoint with NF4, blocksize 64, double quant")
        for key in _TENSOR_KEYS:
            if "weight." + key not in tensors:
                raise EngineError(f"{where}: missing 'weight.{key}' in the checkpoint")
        n = self.out_features * self.in_features
        if tensors["weight"].numel() != (n + 1) // 2:
            raise EngineError(f"{where}: 'weight' has {tensors['weight'].numel()} bytes, expected "
                              f"{(n + 1) // 2} for shape {tuple(expected)}")
        device = None if self.weight.is_meta else self.weight.device
        put = lambda t: t.to(device) if device is not None else t  # noqa: E731
        self.weight = put(tensors["weight"].reshape(-1, 1))
        self.absmax = put(tensors["weight.absmax"])
        self.quant_map = put(tensors["weight.quant_map"].float())
        self.nested_absmax = put(tensors["weight.nested_absmax"].float())
        self.nested_quant_map = put(tensors["weight.nested_quant_map"].float())
        self.offset = put(torch.tensor(float(state["nested_offset"]), dtype=torch.float32))
        self.weight_dtype = getattr(torch, state["dtype"])
        if "bias" in tensors:
            if self.bias is None:
                raise EngineError(f"{where}: the checkpoint has a bias but this layer was built without one")
            self.bias = nn.Parameter(put(tensors["bias"]), requires_grad=False)
        return self

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        mine = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
        known = {"weight", "bias", *("weight." + k for k in (*_TENSOR_KEYS, QUANT_STATE_KEY))}
        unexpected_keys.extend(prefix + k for k in mine if k not in known)
        if "weight" not in mine:
            missing_keys.extend(prefix + k for k in sorted(known) if k != "bias" or self.bias is not None)
            return
        if self.bias is not None and "bias" not in mine:
            missing_keys.append(prefix + "bias")
        self.load_quantized_(mine, where=prefix.rstrip(".") or "NF4Linear")  # EngineError on bad input


def _matches(name: str, skip) -> bool:
    return any(name == s or name.endswith("." + s) for s in skip)


def replace_linears_with_nf4(model: nn.Module, skip=("gate", "lm_head"),
                             compute_dtype: torch.dtype | None = None) -> list[str]:
    """Swap every nn.Linear whose name does not end in a `skip` entry (matched on whole dotted
    components: "gate" skips `block_sparse_moe.gate`, not `mlp.gate_proj`) for an NF4Linear.

    On a meta-device model the new modules start empty (meta), ready for quantize_() or
    load_state_dict(assign=True); on a materialized model each weight is quantized on its device.
    Returns the replaced module names.
    """
    targets = [(name, m) for name, m in model.named_modules()
               if isinstance(m, nn.Linear) and not _matches(name, skip)]
    for name, linear in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        if linear.weight.is_meta:
            new = NF4Linear(linear.in_features, linear.out_features, bias=linear.bias is not None,
                            compute_dtype=compute_dtype, device="meta", dtype=linear.weight.dtype)
        else:
            new = NF4Linear.from_linear(linear, compute_dtype=compute_dtype)
        setattr(parent, child, new)
    return [name for name, _ in targets]
