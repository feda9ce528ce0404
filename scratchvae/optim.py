"""Optimisers that update parameters in place from the gradients the backward passes accumulated."""
from __future__ import annotations

from .backend import array_module, is_device_array

PIECE = 1 << 14  # numbers per piece: the pieces of a parameter, its gradient and its moments fit in cache


def _pieces(*arrays):
    """Matching cache-sized pieces (flat views) of same-shaped contiguous arrays, updated in place.

    On the CPU an update of several operations then reads and writes main memory once per array,
    not once per operation; on the GPU each array is one piece.
    """
    if is_device_array(arrays[0]):
        yield arrays
        return
    flat = [a.reshape(-1) for a in arrays]  # views: parameters and their state are contiguous
    for start in range(0, flat[0].size, PIECE):
        yield tuple(a[start:start + PIECE] for a in flat)


def _params(module_or_params):
    """Accept a Module or an iterable of (name, param, grad) triples; return a list of triples."""
    if hasattr(module_or_params, "named_parameters"):
        return list(module_or_params.named_parameters())
    return list(module_or_params)


class Optimizer:
    """Holds the (name, param, grad) triples and per-parameter state; ``step()`` updates in place."""

    def __init__(self, params, lr):
        self.params = _params(params)
        self.lr = lr
        self.state = {name: {} for name, _, _ in self.params}
        self.t = 0  # steps taken

    def step(self):
        """Apply one update to every parameter from its gradient."""
        self.t += 1
        for name, p, g in self.params:
            self._update(p, g, self.state[name])

    def _update(self, p, g, state):
        raise NotImplementedError

    def zero_grad(self):
        """Zero every gradient this optimiser updates from."""
        for _, _, g in self.params:
            g[...] = 0

    def state_dict(self):
        """Step count, learning rate and per-parameter state arrays, as a flat dict name -> array/number."""
        out = {"t": self.t, "lr": self.lr}
        for name, st in self.state.items():
            for key, arr in st.items():
                out[f"{name}/{key}"] = arr
        return out

    def load_state_dict(self, state):
        """Restore what ``state_dict`` returned (arrays copied onto this optimiser's device)."""
        self.t, self.lr = int(state["t"]), float(state["lr"])
        shapes = {name: p for name, p, _ in self.params}
        for key, arr in state.items():
            if "/" not in key:
                continue
            name, slot = key.rsplit("/", 1)
            if name not in shapes:
                raise KeyError(f"optimiser state names parameter {name!r}, which the model does not have")
            p = shapes[name]
            self.state[name][slot] = array_module(p).asarray(arr, dtype=p.dtype).reshape(p.shape).copy()


class SGD(Optimizer):
    r"""SGD with momentum (PyTorch's form): :math:`v \leftarrow \mu v + g`, :math:`p \leftarrow p - \eta v`.

    ``weight_decay`` adds :math:`\lambda p` to the gradient first.
    """

    def __init__(self, params, lr=0.01, momentum=0.0, weight_decay=0.0):
        super().__init__(params, lr)
        self.momentum, self.weight_decay = momentum, weight_decay

    def _update(self, p, g, state):
        if self.weight_decay:
            g = g + self.weight_decay * p
        if self.momentum:
            if "v" not in state:
                state["v"] = g.copy()
            else:
                state["v"] *= self.momentum
                state["v"] += g
            g = state["v"]
        p -= self.lr * g


class Adam(Optimizer):
    r"""Adam with bias correction (Kingma & Ba, 2015), as PyTorch implements it.

    .. math::
        m \leftarrow \beta_1 m + (1-\beta_1) g, \quad v \leftarrow \beta_2 v + (1-\beta_2) g^2, \\
        p \leftarrow p - \eta \, \frac{m / (1-\beta_1^t)}{\sqrt{v / (1-\beta_2^t)} + \epsilon}

    ``weight_decay`` adds :math:`\lambda p` to the gradient first (L2 regularisation, not AdamW).
    """

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0):
        super().__init__(params, lr)
        self.beta1, self.beta2 = betas
        self.eps, self.weight_decay = eps, weight_decay

    def _update(self, p, g, state):
        xp = array_module(p)
        if self.weight_decay:
            g = g + self.weight_decay * p
        if "m" not in state:
            state["m"], state["v"] = xp.zeros_like(p), xp.zeros_like(p)
        bias1 = 1 - self.beta1 ** self.t
        bias2 = 1 - self.beta2 ** self.t
        for p, g, m, v in _pieces(p, g, state["m"], state["v"]):
            m *= self.beta1
            m += (1 - self.beta1) * g
            v *= self.beta2
            v += (1 - self.beta2) * (g * g)
            p -= (self.lr / bias1) * m / (xp.sqrt(v / bias2) + self.eps)
