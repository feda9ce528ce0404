"""The fast engine's Adam: one update over all the parameters at once, piece by piece in cache; one kernel on a GPU."""
from __future__ import annotations

import math

from .. import optim
from ..backend import array_module, is_device_array
from . import kernels
from .threads import each_piece
from .workspace import flat_parameters, piece_rows, thread_slot

PIECE = 1 << 17  # numbers per piece: a parameter's piece, its gradient's and its moments' (2 MB in all) stay in cache


def _member(a, offset, shape):
    """The view of a group's array that belongs to one parameter: ``shape`` numbers from ``offset`` on."""
    return a.reshape(-1)[offset:offset + math.prod(shape)].reshape(shape)


class Adam(optim.Adam):
    """``optim.Adam``, fast: the same update, run on groups of parameters: all of them at once when they are views
    of one array (``workspace.flatten_parameters``, which ``FastVAE`` sets up), otherwise each alone. The state
    has one array per group and slot; ``state_dict`` names each parameter's part of it, as ``optim.Adam`` does."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0):
        super().__init__(params, lr, betas, eps, weight_decay)
        flat = flat_parameters(params) if hasattr(params, "named_parameters") else None
        if flat is not None:
            members, offset = [], 0
            for name, p, _ in self.params:
                members.append((name, offset, p.shape))
                offset += int(p.size)
            self.groups = [(members, flat[0], flat[1])]
        else:
            self.groups = [([(name, 0, p.shape)], p, g) for name, p, g in self.params]
        self.state = [{} for _ in self.groups]  # per group: slot name -> array shaped like the group's params

    def step(self):
        """Apply one update to every parameter from its gradient."""
        self.t += 1
        for (_, p, g), state in zip(self.groups, self.state):
            self._update(p, g, state)

    def zero_grad(self):
        """Zero every gradient this optimiser updates from, a group at a time."""
        for _, _, g in self.groups:
            g[...] = 0

    def state_arrays(self):
        """Every array of the state: one per group and slot (one each in all, over the flat parameters)."""
        return [arr for state in self.state for arr in state.values()]

    def state_dict(self):
        """As ``optim.Optimizer.state_dict``: each parameter's part of its group's state as ``<param>/<slot>``."""
        out = {"t": self.t, "lr": self.lr}
        for (members, _, _), state in zip(self.groups, self.state):
            for slot, arr in state.items():
                for name, offset, shape in members:
                    out[f"{name}/{slot}"] = _member(arr, offset, shape)
        return out

    def load_state_dict(self, state):
        """Restore what ``state_dict`` returned (arrays copied onto this optimiser's device)."""
        self.t, self.lr = int(state["t"]), float(state["lr"])
        where = {name: (i, offset, shape) for i, (members, _, _) in enumerate(self.groups)
                 for name, offset, shape in members}
        for name, slot, arr in optim.parameter_slots(state, where):
            i, offset, shape = where[name]
            p, group_state = self.groups[i][1], self.state[i]
            xp = array_module(p)
            if slot not in group_state:
                group_state[slot] = xp.zeros_like(p)
            _member(group_state[slot], offset, shape)[...] = xp.asarray(arr, dtype=p.dtype).reshape(shape)

    def _scratch_pieces(self, p):
        """Two scratch arrays of the calling thread's, each as large as the largest of p's pieces, for the step's
        intermediates, so that a step allocates nothing (a fresh temporary can be mapped and page-faulted in on
        every call)."""
        xp, size = array_module(p), piece_rows(p, PIECE) * (p.size // len(p))
        scratch = self.__dict__.setdefault("_scratch", {})
        name = thread_slot()
        s = scratch.get(name)
        if s is None or s.shape[1] < size or s.dtype != p.dtype or array_module(s) is not xp:
            s = scratch[name] = xp.empty((2, size), dtype=p.dtype)
        return s

    def _update(self, p, g, state):
        xp = array_module(p)
        if "m" not in state:
            state["m"], state["v"] = xp.zeros_like(p), xp.zeros_like(p)
        bias1, bias2 = 1 - self.beta1 ** self.t, 1 - self.beta2 ** self.t
        if is_device_array(p):
            return self._update_gpu(p, g, state, bias1, bias2)
        return self._update_cpu(p, g, state, bias1, bias2)

    def _update_cpu(self, p, g, state, bias1, bias2):
        xp = array_module(p)

        def update(p, g, m, v):
            s, t = (a[:p.size].reshape(p.shape) for a in self._scratch_pieces(p))
            if self.weight_decay:
                g = xp.add(g, xp.multiply(p, self.weight_decay, out=t), out=t)
            m *= self.beta1
            m += xp.multiply(g, 1 - self.beta1, out=s)
            v *= self.beta2
            v += xp.multiply(xp.multiply(g, g, out=s), 1 - self.beta2, out=s)
            denominator = xp.add(xp.sqrt(xp.divide(v, bias2, out=s), out=s), self.eps, out=s)
            p -= xp.divide(xp.multiply(m, self.lr / bias1, out=t), denominator, out=t)

        each_piece(update, p, g, state["m"], state["v"], size=PIECE)

    def _update_gpu(self, p, g, state, bias1, bias2):
        # the lines of _update_cpu as one kernel, one pass over the arrays
        kernels.kernel(array_module(p), "adam")(g, self.beta1, self.beta2, self.lr / bias1, bias2, self.eps,
                                                self.weight_decay, p, state["m"], state["v"])
