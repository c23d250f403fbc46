"""ep_kernels: fast Equilibrium Propagation for PyTorch.

    from ep_kernels import EPConv2d, EPLinear, EPNetwork
"""
from ._backend import available_backends, backend_for, use_backend
from .engine import EPResult
from .relaxation import RelaxationDiverged
from .layers import EPConv2d, EPLinear
from .network import EPNetwork

__version__ = "0.1.0"
__all__ = ["EPConv2d", "EPLinear", "EPNetwork", "EPResult", "RelaxationDiverged", "use_backend",
           "available_backends", "backend_for"]
