"""Checkpoints: exact round trip, no pickle, clear errors for corrupted/tampered/mismatched files."""

from __future__ import annotations

import io
import json
import struct

import pytest
import torch
from safetensors import safe_open

from node_engine.checkpoint import Checkpoint, load_checkpoint, load_state_strict, save_checkpoint
from node_engine.errors import CheckpointError


def _trained_pair():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2, betas=(0.8, 0.99), weight_decay=1e-4)
    for _ in range(3):
        opt.zero_grad()
        model(torch.randn(8, 3)).pow(2).sum().backward()
        opt.step()
    return model, opt


def _checkpoint(model, opt):
    return Checkpoint(kind="density", spec={"model": {"type": "x"}, "lr": 0.01}, step=3,
                      model_state=model.state_dict(), optimizer_state=opt.state_dict(),
                      rng_state={"torch": torch.get_rng_state()},
                      dataset={"name": "moons", "standardization": {"mean": [0.5, 1.0], "std": [2.0, 3.0]}},
                      extra={"last_eval": {"test_nll": 2.5}})


def test_round_trip_restores_model_optimizer_and_rng():
    model, opt = _trained_pair()
    data = save_checkpoint(_checkpoint(model, opt))
    ckpt = load_checkpoint(data, kind="density")
    assert ckpt.step == 3 and ckpt.spec["lr"] == 0.01 and ckpt.dataset["name"] == "moons"
    assert ckpt.extra["last_eval"]["test_nll"] == 2.5 and ckpt.versions["torch"] == torch.__version__
    for name, value in model.state_dict().items():
        assert torch.equal(ckpt.model_state[name], value)
    # an optimizer restored from the checkpoint takes exactly the same next step as the original
    model2, opt2 = _trained_pair()
    load_state_strict(model2, ckpt.model_state)
    opt2 = torch.optim.Adam(model2.parameters(), lr=1.0)
    opt2.load_state_dict(ckpt.optimizer_state)
    assert opt2.param_groups[0]["betas"] == (0.8, 0.99) and opt2.param_groups[0]["lr"] == 1e-2
    x = torch.randn(8, 3)
    for m, o in ((model, opt), (model2, opt2)):
        o.zero_grad()
        m(x).pow(2).sum().backward()
        o.step()
    for a, b in zip(model.parameters(), model2.parameters()):
        assert torch.equal(a, b)
    assert ckpt.rng_state["torch"].dtype == torch.uint8


def test_rng_state_restores_the_random_stream():
    state = torch.get_rng_state()
    expected = torch.rand(5)
    model, opt = _trained_pair()
    ckpt = _checkpoint(model, opt)
    ckpt.rng_state = {"torch": state}
    restored = load_checkpoint(save_checkpoint(ckpt)).rng_state["torch"]
    torch.set_rng_state(restored)
    assert torch.equal(torch.rand(5), expected)


def test_file_is_plain_safetensors_with_json_metadata(tmp_path):
    model, opt = _trained_pair()
    path = tmp_path / "c.safetensors"
    path.write_bytes(save_checkpoint(_checkpoint(model, opt)))
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        names = set(f.keys())
    doc = json.loads(meta["odeforge"])
    assert doc["kind"] == "density" and doc["step"] == 3
    assert {"model.0.weight", "rng.torch"} <= names
    assert any(n.startswith("optimizer.state.0.exp_avg") for n in names)


def test_flipped_tensor_byte_is_detected():
    model, opt = _trained_pair()
    data = bytearray(save_checkpoint(_checkpoint(model, opt)))
    data[-3] ^= 0xFF  # inside the tensor payload
    with pytest.raises(CheckpointError, match="digest mismatch"):
        load_checkpoint(bytes(data))


def test_edited_metadata_is_detected():
    model, opt = _trained_pair()
    data = save_checkpoint(_checkpoint(model, opt))
    n = struct.unpack("<Q", data[:8])[0]
    header = data[8:8 + n].decode()
    edited = header.replace('\\"step\\": 3', '\\"step\\": 4')
    assert edited != header and len(edited) == len(header)
    with pytest.raises(CheckpointError, match="digest mismatch"):
        load_checkpoint(data[:8] + edited.encode() + data[8 + n:])


@pytest.mark.parametrize("mangle", [
    lambda d: d[: len(d) // 2],            # truncated
    lambda d: b"",                         # empty
    lambda d: b"\xff" * 8 + d[8:],         # absurd header length
    lambda d: d[:8] + b"[" + d[9:],        # broken JSON header
])
def test_corrupted_bytes(mangle):
    model, opt = _trained_pair()
    with pytest.raises(CheckpointError):
        load_checkpoint(mangle(save_checkpoint(_checkpoint(model, opt))))


def test_pickle_files_are_refused_not_unpickled():
    buffer = io.BytesIO()
    torch.save({"weight": torch.zeros(2)}, buffer)
    with pytest.raises(CheckpointError):
        load_checkpoint(buffer.getvalue())


def test_foreign_safetensors_and_wrong_kind():
    from safetensors.torch import save

    with pytest.raises(CheckpointError, match="not an odeforge checkpoint"):
        load_checkpoint(save({"w": torch.zeros(2)}))
    model, opt = _trained_pair()
    with pytest.raises(CheckpointError, match="expected 'classifier'"):
        load_checkpoint(save_checkpoint(_checkpoint(model, opt)), kind="classifier")


def test_mismatched_model():
    model, opt = _trained_pair()
    ckpt = load_checkpoint(save_checkpoint(_checkpoint(model, opt)))
    other = torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.Tanh(), torch.nn.Linear(5, 2))
    with pytest.raises(CheckpointError, match="shape mismatch"):
        load_state_strict(other, ckpt.model_state)
    with pytest.raises(CheckpointError, match="missing"):
        load_state_strict(torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2),
                                              torch.nn.Linear(2, 2)), ckpt.model_state)


def test_non_json_metadata_refused():
    model, opt = _trained_pair()
    ckpt = _checkpoint(model, opt)
    ckpt.extra = {"bad": float("nan")}
    with pytest.raises(CheckpointError, match="JSON"):
        save_checkpoint(ckpt)
