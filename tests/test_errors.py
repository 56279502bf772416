"""One error discipline: jf.errors' classes subclass the built-in a caller would catch."""
import pytest
import torch

import jsp_fast as jf
from jsp_fast import errors


def test_hierarchy_and_public_face():
    assert "errors" in jf.__all__ and jf.errors is errors
    assert set(errors.__all__) >= {"JspFastError", "ConfigError", "CheckpointError", "ShapeError", "SolverError",
                                   "DataError", "ResumeMismatchError"}
    for name, builtin in (("ConfigError", ValueError), ("CheckpointError", ValueError), ("ShapeError", ValueError),
                          ("DataError", ValueError), ("ResumeMismatchError", ValueError),
                          ("SolverError", RuntimeError)):
        cls = getattr(errors, name)
        assert issubclass(cls, errors.JspFastError) and issubclass(cls, builtin), name
    assert issubclass(errors.ResumeMismatchError, errors.ConfigError)


def test_one_class_per_error_everywhere():
    """The old import paths name the very same classes (existing ``except`` clauses keep working)."""
    from jsp_fast.cnf import SolverError as cnf_solver
    from jsp_fast.training import CheckpointError as training_ckpt
    from jsp_fast.training.checkpoint import CheckpointError as module_ckpt
    assert jf.SolverError is cnf_solver is errors.SolverError
    assert training_ckpt is module_ckpt is errors.CheckpointError


def test_a_real_solver_failure_is_a_jsp_fast_error(one_thread):
    torch.manual_seed(0)
    model = jf.CNF(2, hidden=(8,), rtol=1e-9, atol=1e-9, options={"max_num_steps": 2})
    with pytest.raises(errors.JspFastError) as info:
        model.log_prob(torch.randn(4, 2))
    assert isinstance(info.value, RuntimeError) and isinstance(info.value, jf.SolverError)


def test_a_missing_checkpoint_is_caught_as_value_error_and_jsp_fast_error(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        jf.load(tmp_path / "nothing")
    with pytest.raises(errors.JspFastError):
        jf.load(tmp_path / "nothing")


def test_train_resume_argument_is_checked(one_thread):
    torch.manual_seed(0)
    x = torch.randn(16, 2)
    with pytest.raises(errors.ConfigError, match="resume must be 'must-match'.*got 'maybe'"):
        jf.train(jf.CNF(2, hidden=(4,)), x, steps=1, resume="maybe", progress=False)
