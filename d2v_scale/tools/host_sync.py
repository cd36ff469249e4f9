"""`HostSyncCheck`: fail on what would make the host wait for a GPU, detectable on a CPU run too.

On a GPU, `torch.cuda.set_sync_debug_mode("error")` raises on a synchronising CUDA call; on CPU there is
no device to wait for, so this mode looks for the operations that wait on a GPU, by what they are:
  - reading a device value on the host: `aten._local_scalar_dense` (`.item()`, `bool(t)`, `int(t)`,
    `float(t)`, `if t:`), `Tensor.tolist()/.numpy()/.cpu()` of a tensor the step made;
  - ops whose output shape depends on the data (`nonzero`, `masked_select`, `unique`, boolean-mask
    indexing, `repeat_interleave` without `output_size`): the host reads the size back;
  - host-to-device copies that block: a host tensor's `.to(device)` / `.cuda()` without
    `non_blocking=True`, `new_tensor(...)`, `torch.tensor(..., device=...)` (a pageable copy,
    synchronous on CUDA); device-to-device `.to` is not a wait.
Host tensors handed in (`host=`, e.g. the loader's batch and the signal flags) may be read freely.
Each hit raises `HostSyncError` naming the call, or with `record=True` is collected in `.hits`.
"""
from __future__ import annotations

import traceback

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten

# ops that read a value back or size their output from the data
SYNCING_OPS = {aten._local_scalar_dense.default, aten.nonzero.default, aten.nonzero_static.default,
               aten.masked_select.default, aten._unique2.default, aten.unique_dim.default,
               aten.unique_consecutive.default, aten.repeat_interleave.Tensor, aten.is_nonzero.default,
               aten.index.Tensor, aten.argwhere.default}

_READS = {torch.Tensor.item: "item()", torch.Tensor.tolist: "tolist()", torch.Tensor.numpy: "numpy()",
          torch.Tensor.cpu: "cpu()", torch.Tensor.__bool__: "bool()", torch.Tensor.__int__: "int()",
          torch.Tensor.__float__: "float()"}


class HostSyncError(RuntimeError):
    pass


def _where() -> str:
    """The innermost frame of the project's own code (or the innermost frame) of the current stack."""
    frames = [f for f in traceback.extract_stack()[:-3] if "host_sync.py" not in f.filename]
    own = [f for f in frames if "d2v_scale" in f.filename] or frames
    f = own[-1]
    return f"{f.filename.rsplit('/', 2)[-2]}/{f.filename.rsplit('/', 1)[-1]}:{f.lineno} ({f.line})"


class _Dispatch(TorchDispatchMode):
    def __init__(self, check):
        super().__init__()
        self.check = check

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in SYNCING_OPS and not self.check._is_host(args):
            if func is aten.index.Tensor and not any(                    # only boolean-mask indexing sizes by data
                    t is not None and t.dtype == torch.bool for t in (args[1] if len(args) > 1 else [])):
                return func(*args, **kwargs)
            if func is aten.repeat_interleave.Tensor and kwargs.get("output_size") is not None:
                return func(*args, **kwargs)
            self.check._hit(f"aten.{func.__name__}")
        return func(*args, **kwargs)


class HostSyncCheck(TorchFunctionMode):
    """`with HostSyncCheck(device, host=[tensors]):` around code that must not wait for the device."""

    def __init__(self, device: torch.device | str, host=(), record: bool = False):
        super().__init__()
        self.device = torch.device(device)
        self.host = {id(t) for t in host}
        self.host_ptrs = {t.untyped_storage().data_ptr() for t in host if isinstance(t, torch.Tensor)}
        self.record, self.hits = record, []
        self._dispatch = _Dispatch(self)

    def _is_host(self, args) -> bool:
        first = next((a for a in args if isinstance(a, torch.Tensor)), None)
        return first is not None and (id(first) in self.host or first.untyped_storage().data_ptr() in self.host_ptrs)

    def _hit(self, what: str) -> None:
        msg = f"{what} at {_where()}"
        if self.record:
            self.hits.append(msg)
        else:
            raise HostSyncError(f"the host would wait for the device: {msg}")

    def _targets_device(self, args, kwargs) -> bool:
        for a in [*args, kwargs.get("device")]:
            if isinstance(a, (str, torch.device)):
                try:
                    return torch.device(a).type == self.device.type
                except RuntimeError:
                    continue
        return False

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _READS and args and isinstance(args[0], torch.Tensor) and not self._is_host(args):
            self._hit(f"Tensor.{_READS[func]}")
        elif (func is torch.Tensor.to and not kwargs.get("non_blocking", False) and self._is_host(args)
              and self._targets_device(args[1:], kwargs)):                 # a host tensor's blocking copy
            if not (len(args) > 2 and args[2] is True):                     # to(device, dtype, non_blocking)
                self._hit("Tensor.to(device) without non_blocking=True")
        elif func is torch.Tensor.cuda and not kwargs.get("non_blocking", False):
            self._hit("Tensor.cuda() without non_blocking=True")
        elif func is torch.Tensor.new_tensor:
            self._hit("Tensor.new_tensor (a host-to-device copy)")
        elif func in (torch.tensor, torch.as_tensor) and self._targets_device(args[1:], kwargs):
            self._hit(f"torch.{func.__name__}(..., device=) (a host-to-device copy)")
        return func(*args, **kwargs)

    def __enter__(self):
        self._dispatch.__enter__()
        return super().__enter__()

    def __exit__(self, *exc):
        out = super().__exit__(*exc)
        self._dispatch.__exit__(*exc)
        return out
