"""Continuous normalizing flows: concatsquash vector fields and the FFJORD-style CNF."""
from ._cnf import CNF, FIXED_STEP_SOLVERS, NOISES, SOLVERS, STATS, TRACES, SolverError
from ._layers import ACTIVATIONS, ConcatSquashLinear, ODEnet

__all__ = ["CNF", "ODEnet", "ConcatSquashLinear", "SolverError", "ACTIVATIONS", "TRACES", "NOISES",
           "SOLVERS", "FIXED_STEP_SOLVERS", "STATS"]
