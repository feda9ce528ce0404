"""Memory the fast layers keep from step to step: work arrays, recycled outputs, and flat parameters.

``Workspace`` is mixed into every fast layer (``class Conv2d(Workspace, layers.Conv2d)``); the functions below
act on a whole model: ``flatten_parameters`` puts every parameter in one array (and every gradient, every
buffer), so that Adam, ``zero_grad`` and the buffers' snapshot each touch one array instead of dozens.
"""
from __future__ import annotations

import contextlib
import math
import threading

from ..backend import array_module, is_device_array


def memory_order(a):
    """The axes of ``a`` from the one with the largest stride to the smallest: the order its numbers lie in memory."""
    return sorted(range(a.ndim), key=lambda axis: -a.strides[axis])


def _inverse(order):
    return [order.index(axis) for axis in range(len(order))]


def pieces(*arrays, size):
    """Matching slices, along the first axis, of same-shaped arrays, of about ``size`` numbers each.

    For a few in-place operations over large arrays done piece by piece: on the CPU the operations after
    the first then find the piece's operands in cache instead of main memory. Device arrays, and arrays
    of at most ``size`` numbers, come as one piece: on a GPU one kernel per operation is what is fast.
    """
    first = arrays[0]
    step = piece_rows(first, size)
    if step >= len(first):
        yield arrays
        return
    for start in range(0, len(first), step):
        yield tuple(a[start:start + step] for a in arrays)


def piece_rows(a, size):
    """How many rows (slices along the first axis) of ``a`` one of its ``pieces`` of ``size`` numbers has."""
    if is_device_array(a) or a.size <= size:
        return len(a)
    return max(1, size // (a.size // len(a)))  # whole rows (or images) of about `size` numbers


WORKER_PREFIX = "scratchvae-"  # the names of the threads of fast.threads


def thread_slot():
    """``"caller"``, or the name of the ``threads`` worker this runs on: whose scratch a piece may use."""
    name = threading.current_thread().name
    return name if name.startswith(WORKER_PREFIX) else "caller"


class Workspace:
    """Work arrays for a layer: scratch memory and outputs that live from call to call."""

    recycle_outputs = False  # True inside a training step: see output_array

    def __getstate__(self):
        # copies and pickles leave the work arrays behind: scratch, made again on first use (and their
        # signatures hold the array module, which neither copies nor pickles)
        state = dict(self.__dict__)
        state.pop("_work", None)
        state.pop("_arena", None)  # (the model that shares it shares a new one: FastVAE.__setstate__)
        return state

    def work_array(self, name, shape, dtype, xp, fill=None, tag=None):
        """A scratch array kept from call to call instead of being allocated anew every step.

        Allocated (filled with the number ``fill``, if given) on first use and whenever ``shape``, ``dtype``,
        device or ``tag`` change; otherwise handed back exactly as the last call left it.
        """
        work = self.__dict__.setdefault("_work", {})
        signature = (tuple(shape), xp.dtype(dtype), xp, tag)
        entry = work.get(name)
        if entry is None or entry[0] != signature:
            entry = (signature, xp.empty(shape, dtype=dtype) if fill is None else xp.full(shape, fill, dtype=dtype))
            work[name] = entry
        return entry[1]

    def scratch_array(self, name, shape, dtype, xp):
        """A work array for the length of one call only, its contents undefined: shared by every layer of a model
        (``share_scratch``), so that a model keeps one array of each name, the size of its largest layer's, instead
        of one per layer. A layer on its own keeps its own (``work_array``)."""
        arena = self.__dict__.get("_arena")
        if arena is None:
            return self.work_array(name, shape, dtype, xp)
        size, key = math.prod(shape), (name, xp.dtype(dtype), xp)
        flat = arena.get(key)
        if flat is None or flat.size < size:
            flat = arena[key] = xp.empty(size, dtype=dtype)
        return flat[:size].reshape(shape)

    def thread_array(self, name, shape, dtype, xp):
        """``work_array`` of the calling thread's own: scratch for a piece of ``threads.each_piece``, which pieces
        on other threads must not share (one for the caller, whichever thread it is, and one per worker)."""
        return self.work_array(f"{name} {thread_slot()}", shape, dtype, xp)

    def output_array(self, name, shape, dtype, xp):
        """The array to write an output into: a new one, or inside a training step the one of the last step
        (no fresh memory, whose first touch costs a page fault per 4 KiB); an input gradient ``"dx"`` there, in a
        model that shares its scratch (``share_scratch``), one of two arrays that every layer takes in turn."""
        if not self.recycle_outputs:
            return xp.empty(shape, dtype=dtype)
        arena = self.__dict__.get("_arena")
        if name == "dx" and arena is not None:
            # an input gradient is used up by the layer before, whose own goes to the other of two shared arrays
            # (so a model keeps two, the size of its largest, instead of one per layer)
            turn = arena["dx turn"] = 1 - arena.get("dx turn", 0)
            return self.scratch_array(f"dx {turn}", shape, dtype, xp)
        return self.work_array("output " + name, shape, dtype, xp)

    def output_like(self, name, x):
        """``output_array`` for an output of x's shape and dtype, laid out in memory like x (see ``memory_order``),
        so that elementwise operations read and write both in the same order."""
        xp = array_module(x)
        if not self.recycle_outputs:
            return xp.empty_like(x)
        order = memory_order(x)
        out = self.output_array(name, tuple(x.shape[i] for i in order), x.dtype, xp)
        return out.transpose(_inverse(order))

    def padded(self, name, x, top, bottom, left, right):
        """NHWC ``x`` copied into the middle of a work array with zero borders of the given widths.

        The borders are zeroed once, when the array is made; later calls with the same geometry
        overwrite only the middle, so padding costs one copy of x and no fill.
        """
        n, h, w, c = x.shape
        shape = (n, top + h + bottom, left + w + right, c)
        out = self.work_array(name, shape, x.dtype, array_module(x), fill=0, tag=(top, left, h, w))
        inside = out[:, top:top + h, left:left + w, :]
        if c > 1 and x.strides[3] > x.strides[2]:
            # x is held as channel planes (images, NCHW): copied plane by plane, the copies run along whole rows
            for channel in range(c):
                inside[..., channel] = x[..., channel]
        else:
            inside[...] = x
        return out


def share_scratch(model):
    """Let every layer below ``model`` share one set of scratch arrays (``scratch_array``); returns model."""
    arena = {}
    for _, module in model.named_modules():
        if isinstance(module, Workspace):
            module.__dict__["_arena"] = arena
    return model


@contextlib.contextmanager
def recycling_outputs(model):
    """Within the block, every layer below ``model`` writes its outputs over those of its previous call
    (``Workspace.output_array``). Only for code whose results are all used up before the next call."""
    modules = [m for _, m in model.named_modules()]
    saved = [m.__dict__.get("recycle_outputs") for m in modules]
    for m in modules:
        m.recycle_outputs = True
    try:
        yield model
    finally:
        for m, flag in zip(modules, saved):
            if flag is None:
                del m.recycle_outputs
            else:
                m.recycle_outputs = flag


# ---- flat parameters -----------------------------------------------------------------------------------

def flatten_parameters(model):
    """Move every parameter below ``model`` into one contiguous array, every gradient into another and every
    buffer into a third; each module's ``params``, ``grads`` and ``buffers`` then hold views of them (values
    kept). Returns model. Done once: moving them again would strand an optimiser holding the old arrays."""
    if flat_parameters(model) is not None:
        return model
    named = list(model.named_parameters())
    modules = [id(m) for _, m in model.named_modules()]
    if not named or len({p.dtype for _, p, _ in named}) > 1 or len(set(modules)) < len(modules):
        return model  # nothing to do, dtypes that cannot share an array, or a module shared by two parents
    xp, dtype = array_module(named[0][1]), named[0][1].dtype
    total = sum(int(p.size) for _, p, _ in named)
    flat_p, flat_g = xp.empty(total, dtype=dtype), xp.empty(total, dtype=dtype)
    buffers = list(model.named_buffers())
    same_dtype = all(b.dtype == dtype for _, b in buffers)
    flat_b = xp.empty(sum(int(b.size) for _, b in buffers), dtype=dtype) if same_dtype else None
    offset = offset_b = 0
    for _, mod in model.named_modules():
        for name, p in mod.params.items():
            size, g = int(p.size), mod.grads[name]
            flat_p[offset:offset + size] = p.reshape(-1)
            flat_g[offset:offset + size] = g.reshape(-1)
            mod.params[name] = flat_p[offset:offset + size].reshape(p.shape)
            mod.grads[name] = flat_g[offset:offset + size].reshape(g.shape)
            offset += size
        for name, b in mod.buffers.items() if same_dtype else ():
            size = int(b.size)
            flat_b[offset_b:offset_b + size] = b.reshape(-1)
            mod.buffers[name] = flat_b[offset_b:offset_b + size].reshape(b.shape)
            offset_b += size
    model.__dict__["_flat"] = (flat_p, flat_g, flat_b)
    return model


def flat_parameters(model):
    """``(params, grads)``, the two arrays of ``flatten_parameters``, in the order of ``named_parameters``, while
    every parameter and gradient is still a view of them (a deep copy gives each its own memory); else None."""
    flat = model.__dict__.get("_flat")
    if flat is None:
        return None
    flat_p, flat_g, _ = flat
    if all(p.base is flat_p and g.base is flat_g for _, p, g in model.named_parameters()):
        return flat_p, flat_g
    return None


def flat_buffers(model):
    """The buffers' one array of ``flatten_parameters``, while every buffer is still a view of it; else None."""
    flat = model.__dict__.get("_flat")
    flat_b = None if flat is None else flat[2]
    if flat_b is not None and all(b.base is flat_b for _, b in model.named_buffers()):
        return flat_b
    return None
