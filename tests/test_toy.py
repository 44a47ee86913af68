"""The reverse- vs forward-KL toy (exp/toy_exp/rkl_fkl.py): with a policy family that cannot
represent the bimodal optimum, EXO (mode-seeking) scores a higher RLHF objective than DPO
(mean-seeking); with a tabular policy both reach the optimum."""
import sys

import pytest
import torch
from helpers import REPO_ROOT

sys.path.insert(0, str(REPO_ROOT / "exp" / "toy_exp"))
import rkl_fkl  # noqa: E402


@pytest.fixture(scope="module")
def fits():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return rkl_fkl.run()
    finally:
        torch.set_num_threads(threads)


def test_optimum_is_bimodal():
    """Otherwise the toy shows nothing: pi* has two separated modes with a valley between."""
    pi_star = rkl_fkl.log_pi_star().exp()
    left, right = pi_star[rkl_fkl.GRID < 0], pi_star[rkl_fkl.GRID > 0]
    valley = pi_star[rkl_fkl.GRID.abs() < 0.1].max()
    assert left.sum() > 0.1 and right.sum() > 0.1
    assert valley < 0.01 * min(left.max(), right.max())


def test_limited_capacity_exo_beats_dpo(fits):
    exo, dpo = fits["unimodal"]["EXO"], fits["unimodal"]["DPO"]
    j_exo, j_dpo = rkl_fkl.objective(exo), rkl_fkl.objective(dpo)
    assert j_exo > j_dpo + 0.1, (j_exo, j_dpo)
    assert rkl_fkl.kl_to_optimum(exo) < rkl_fkl.kl_to_optimum(dpo)
    # EXO sits on one mode (narrow, centred on a reward peak); DPO covers both (wide)
    grid = rkl_fkl.GRID
    mean = lambda log_pi: float((log_pi.exp() * grid).sum())  # noqa: E731
    std = lambda log_pi: float((log_pi.exp() * (grid - mean(log_pi)) ** 2).sum().sqrt())  # noqa: E731
    assert abs(abs(mean(exo)) - 0.5) < 0.05 and std(exo) < 0.1
    assert std(dpo) > 0.25


def test_full_capacity_both_reach_the_optimum(fits):
    for method, log_pi in fits["tabular"].items():
        assert rkl_fkl.kl_to_optimum(log_pi) < 0.02, method
        assert rkl_fkl.objective(log_pi) == pytest.approx(rkl_fkl.objective(rkl_fkl.log_pi_star()), abs=2e-3)


def test_plot_writes_the_figure(fits, tmp_path):
    path = tmp_path / "rkl_fkl.png"
    rkl_fkl.plot(fits, str(path))
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
