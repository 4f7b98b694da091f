"""compile_field: a torch.compile'd vector field gives the eager answers (to round-off), with the
same step sequence, in odeint and through odeint_adjoint."""

import shutil

import pytest
import torch
from torch import nn

from node_engine import SolverStats, compile_field, odeint, odeint_adjoint

pytestmark = pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None,
                                reason="torch.compile's inductor backend needs a C++ compiler")


class Field(nn.Module):
    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.l1, self.l2 = nn.Linear(2, 16), nn.Linear(16, 2)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.7)

    def forward(self, t, y):
        return self.l2(torch.tanh(self.l1(y))) * (1 + 0.1 * t)


def test_rejects_non_callable():
    with pytest.raises(TypeError):
        compile_field(3)


@pytest.mark.slow  # inductor compiles C++: 20-40 s on 2 cores, the fast tier's largest cost
def test_compiled_field_matches_eager():
    eager = Field()
    compiled = compile_field(eager)
    y0 = torch.randn(64, 2, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([0.0, 0.5, 1.0])
    s_e, s_c = SolverStats(), SolverStats()
    with torch.no_grad():
        ye = odeint(eager, y0, t, rtol=1e-6, atol=1e-6, stats=s_e)
        yc = odeint(compiled, y0, t, rtol=1e-6, atol=1e-6, stats=s_c)
    torch.testing.assert_close(yc, ye, rtol=1e-5, atol=1e-6)
    assert s_c.nfe_forward == s_e.nfe_forward and s_c.steps_accepted == s_e.steps_accepted
    # the adjoint finds the compiled module's parameters and gives the eager gradient
    y = y0.clone().requires_grad_(True)
    ge = torch.autograd.grad(odeint_adjoint(eager, y, t, rtol=1e-6, atol=1e-6)[-1].square().sum(),
                             (y, *eager.parameters()))
    gc = torch.autograd.grad(odeint_adjoint(compiled, y, t, rtol=1e-6, atol=1e-6)[-1].square().sum(),
                             (y, *compiled.parameters()))
    assert len(ge) == len(gc)
    for a, b in zip(gc, ge):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
