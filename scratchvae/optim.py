"""Optimisers that update parameters in place from the gradients the backward passes accumulated."""
from __future__ import annotations

from .backend import array_module


class Optimizer:
    """Holds the (name, param, grad) triples and each parameter's state; ``step()`` updates them in place."""

    def __init__(self, params, lr):
        # a Module, or an iterable of (name, param, grad) triples
        self.params = list(params.named_parameters() if hasattr(params, "named_parameters") else params)
        self.lr = lr
        self.t = 0  # steps taken
        self.state = {name: {} for name, _, _ in self.params}  # parameter name -> slot name -> array

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

    def state_arrays(self):
        """Every array of the optimiser's state (Adam's moments), for checks of the whole."""
        return [arr for slots in self.state.values() for arr in slots.values()]

    def state_dict(self):
        """Step count, learning rate and state arrays, as a flat dict: ``t``, ``lr``, ``<param>/<slot>``
        (e.g. ``encoder.0.W/m``; the arrays themselves, not copies)."""
        out = {"t": self.t, "lr": self.lr}
        for name, slots in self.state.items():
            out.update({f"{name}/{slot}": arr for slot, arr in slots.items()})
        return out

    def load_state_dict(self, state):
        """Restore what ``state_dict`` returned (arrays copied onto the parameters' device)."""
        self.t, self.lr = int(state["t"]), float(state["lr"])
        params = {name: p for name, p, _ in self.params}
        for name, slot, arr in parameter_slots(state, params):
            p = params[name]
            self.state[name][slot] = array_module(p).asarray(arr, dtype=p.dtype).reshape(p.shape).copy()


def parameter_slots(state, names):
    """The ``(parameter, slot, array)`` entries of a ``state_dict``; a KeyError for a parameter not in ``names``."""
    for key, arr in state.items():
        if "/" in key:
            name, slot = key.rsplit("/", 1)
            if name not in names:
                raise KeyError(f"optimiser state names parameter {name!r}, which the model does not have")
            yield name, slot, arr


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
            state["v"] = g.copy() if "v" not in state else self.momentum * state["v"] + g
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
        if "m" not in state:
            state["m"], state["v"] = xp.zeros_like(p), xp.zeros_like(p)
        if self.weight_decay:
            g = g + self.weight_decay * p
        m, v = state["m"], state["v"]
        m[...] = self.beta1 * m + (1 - self.beta1) * g
        v[...] = self.beta2 * v + (1 - self.beta2) * (g * g)
        p -= (self.lr / (1 - self.beta1 ** self.t)) * m / (xp.sqrt(v / (1 - self.beta2 ** self.t)) + self.eps)
