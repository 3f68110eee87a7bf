"""A live-bytes tracker for the CPU: what the memory tests measure against the arithmetic."""

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


class LiveBytes(TorchDispatchMode):
    """The bytes of the tensors alive while active, op by op: `now`, and `peak` since entering.
    Every storage an op returns is counted once, from the op that makes it until it is freed (a
    weak-reference finalizer on the storage: its Python object lives exactly as long as the
    storage). Tensors made before entering count only if given (`tensors`). What an op allocates
    and frees inside itself is not seen: these are the tensors' own sizes, as the memory
    arithmetic counts them."""

    def __init__(self, *tensors):
        super().__init__()
        self.sizes, self.now = {}, 0
        for t in tensors:
            self.track(t)
        self.peak = self.now

    def track(self, t):
        storage = t.untyped_storage()
        key = storage._cdata
        if key not in self.sizes:
            self.sizes[key] = storage.nbytes()
            self.now += storage.nbytes()
            weakref.finalize(storage, self.free, key)

    def free(self, key):
        self.now -= self.sizes.pop(key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.track(t)
        self.peak = max(self.peak, self.now)
        return out
