"""Python PyTorch (2.x) as the peer of dcpp's libtorch adapter, both directions.

    libtorch_peer.py check DIR   load what examples/libtorch_train.cc saved, compare outputs
    libtorch_peer.py save DIR    train Net a few steps, save it the same way for libtorch to load

DIR/ckpt holds {"model": ..., "optim": ...} written by 4 MPI ranks; DIR/eval the C++ side's
evaluation batch, its output, and its output after one more Adam step. This script builds the
same architecture, takes the template from get_state_dict(model, optim), checks that the
checkpoint has exactly the template's keys, loads it with dcp.load + set_state_dict, and checks
that the network gives the C++ output and that one more Adam step gives the C++ result too (so
the optimizer state and options came across). Exits non-zero on any mismatch.

`save` writes DIR/ckpt with dcp.save({"model": msd, "optim": osd}) after get_state_dict, and
DIR/eval with an input batch, the output, a target and the output after one more Adam step, which
the C++ test (LibtorchAdapterTest.LoadsWhatPyTorchSaved) reproduces with libtorch.
"""
import os
import sys
import warnings

import torch
import torch.distributed.checkpoint as dcp
import torch.nn as nn
from torch.distributed.checkpoint._nested_dict import flatten_state_dict
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

warnings.filterwarnings("ignore")  # dcp warns that no process group is initialized


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(8, 16)
        self.bn = nn.BatchNorm1d(16)
        self.fc2 = nn.Linear(16, 4)

    def forward(self, x):
        return self.fc2(torch.relu(self.bn(self.fc1(x))))


def save(d):
    ckpt, eval_dir = os.path.join(d, "ckpt"), os.path.join(d, "eval")
    torch.manual_seed(0)
    model = Net()
    optim = torch.optim.Adam(model.parameters(), lr=2e-2, betas=(0.85, 0.995))
    x, y = torch.randn(64, 8), torch.randn(64, 4)
    model.train()
    for _ in range(7):
        optim.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        optim.step()
    msd, osd = get_state_dict(model, optim)
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=ckpt)
    model.eval()
    ex, ey = torch.randn(32, 8), torch.randn(32, 4)
    with torch.no_grad():
        out = model(ex)
    optim.zero_grad()
    nn.functional.mse_loss(model(ex), ey).backward()
    optim.step()
    with torch.no_grad():
        after = model(ex)
    dcp.save({"input": ex, "target": ey, "output": out, "output_after_step": after},
             checkpoint_id=eval_dir)
    print(f"PyTorch {torch.__version__} saved Net + Adam (7 steps) to {ckpt}")
    return 0


def check(d):
    ckpt, eval_dir = os.path.join(d, "ckpt"), os.path.join(d, "eval")
    torch.manual_seed(123)  # other weights than the C++ side's, so a load that did nothing fails
    model = Net()
    optim = torch.optim.Adam(model.parameters(), lr=0.5)  # the checkpoint's lr must replace it
    msd, osd = get_state_dict(model, optim)
    template = {"model": msd, "optim": osd}

    stored = dcp.FileSystemReader(ckpt).read_metadata().state_dict_metadata
    flat, _ = flatten_state_dict(template)
    if set(flat) != set(stored):
        print("keys only in the checkpoint:", sorted(set(stored) - set(flat)))
        print("keys only in Python's get_state_dict:", sorted(set(flat) - set(stored)))
        return 1

    dcp.load(template, checkpoint_id=ckpt)
    set_state_dict(model, optim, model_state_dict=template["model"],
                   optim_state_dict=template["optim"])
    group = optim.param_groups[0]
    assert group["lr"] == 1e-2 and group["betas"] == (0.9, 0.999), group
    steps = {float(s["step"]) for s in optim.state.values()}
    assert len(steps) == 1, steps

    emd = dcp.FileSystemReader(eval_dir).read_metadata().state_dict_metadata
    ev = {k: torch.empty(tuple(m.size), dtype=m.properties.dtype) for k, m in emd.items()}
    dcp.load(ev, checkpoint_id=eval_dir)

    model.eval()
    with torch.no_grad():
        out = model(ev["input"])
    err = (out - ev["output"]).abs().max().item()
    if not torch.allclose(out, ev["output"], atol=1e-5, rtol=1e-5):
        print(f"output differs from libtorch's: max abs error {err}")
        return 1
    optim.zero_grad()
    nn.functional.mse_loss(model(ev["input"]), ev["target"]).backward()
    optim.step()
    with torch.no_grad():
        after = model(ev["input"])
    err_after = (after - ev["output_after_step"]).abs().max().item()
    if not torch.allclose(after, ev["output_after_step"], atol=1e-5, rtol=1e-5):
        print(f"output after one more Adam step differs: max abs error {err_after}")
        return 1
    print(f"PyTorch {torch.__version__}: {len(stored)} keys as get_state_dict names them; "
          f"Adam step {int(steps.pop())}; output max abs error {err:.2e}, after one more "
          f"step {err_after:.2e}")
    return 0


if __name__ == "__main__":
    sys.exit({"check": check, "save": save}[sys.argv[1]](sys.argv[2]))
