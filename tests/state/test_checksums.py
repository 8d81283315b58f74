"""Checksums per block: a changed byte in a saved optimizer payload is refused on load (plain
``load_state_dict``, torch's ``set_optimizer_state_dict`` and DCP checkpoints), naming the
block, with the optimizer and model left as they were; checkpoints without checksums (written
before them) still load."""

from __future__ import annotations

import glob
import os

import pytest
import torch
from convnet import OPTS, make_model, train
from torch.distributed.checkpoint.state_dict import (
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)

from sharded_shampoo import ShardedShampoo
from sharded_shampoo.checkpoint import load_checkpoint, save_checkpoint


def _trained(seed=0):
    model = make_model(seed=seed)
    opt = ShardedShampoo(model.parameters(), **OPTS)
    train(model, opt, 6)
    return model, opt


def _snapshot(model, opt):
    out = [p.detach().clone() for p in model.parameters()]
    for p in opt.state:
        out += [v.clone() for _, v in sorted(opt.state[p].items()) if isinstance(v, torch.Tensor)]
    return out


def _same(a, b):
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def _flip(t: torch.Tensor, at: int = 5) -> None:
    """Flips one bit of one byte of ``t``, in place."""
    raw = t.view(-1).view(torch.uint8)
    raw[at] ^= 0x10


def _block_key(state: dict, what: str) -> str:
    return next(k for k in sorted(state) if k.startswith("blocks.") and what in k)


def test_every_block_carries_a_checksum_that_changes_with_any_byte():
    model, opt = _trained()
    sd = opt.state_dict()
    for state in sd["state"].values():
        blocks = {k.split(".")[1] for k in state if k.startswith("blocks.")}
        assert blocks == {k.split(".")[1] for k in state if k.endswith(".checksum")}
    state = sd["state"][0]
    key = _block_key(state, "factor")
    bid = key.split(".")[1]
    before = state[f"blocks.{bid}.checksum"].clone()
    _flip(state[key])
    opt2 = ShardedShampoo(make_model().parameters(), **OPTS)
    opt2.load_state_dict(opt.state_dict())  # an intact dict loads
    again = opt.state_dict()["state"][0][f"blocks.{bid}.checksum"]
    assert torch.equal(again, before)  # the flip was in the copy, not the live state


@pytest.mark.parametrize("what", ["factor", "root", "graft", "checksum"])
def test_a_flipped_byte_is_refused_naming_the_block(what):
    model, opt = _trained()
    sd = opt.state_dict()
    key = _block_key(sd["state"][1], what)
    _flip(sd["state"][1][key], at=0 if what == "checksum" else 5)
    other_model, other = _trained(seed=3)
    before = _snapshot(other_model, other)
    bid = key.split(".")[1]
    with pytest.raises(ValueError, match=rf"saved state of block {bid} of .* checksum"):
        other.load_state_dict(sd)
    assert _same(before, _snapshot(other_model, other))


def test_torchs_state_dict_api_refuses_a_flipped_byte():
    model, opt = _trained()
    osd = get_optimizer_state_dict(model, opt)
    key = next(k for k in osd["state"]["0.weight"] if k.endswith("factor_0"))
    _flip(osd["state"]["0.weight"][key])
    other_model, other = _trained(seed=3)
    before = _snapshot(other_model, other)
    with pytest.raises(
        ValueError, match=r"block 0 of param_groups\[0\]\['params'\]\[0\] .* checksum"
    ):
        set_optimizer_state_dict(other_model, other, osd)
    assert _same(before, _snapshot(other_model, other))


@pytest.mark.fault
def test_a_dcp_checkpoint_with_a_flipped_byte_is_refused(tmp_path, fault_row):
    """The byte is changed in the file DCP wrote: the bytes of one saved factor are found in
    it and one of them flipped."""
    row = fault_row(
        "one bit flipped in a saved factor (DCP file)",
        "the load is refused naming the block; model and optimizer unchanged",
    )
    model, opt = _trained()
    path = str(tmp_path / "ckpt")
    save_checkpoint(path, model, opt)
    state = opt.state[next(iter(opt.state))]
    factor = state[_block_key(state, "factor")]
    needle = factor.contiguous().view(-1).view(torch.uint8).numpy().tobytes()[:32]
    (file,) = [
        f for f in glob.glob(os.path.join(path, "*.distcp")) if needle in open(f, "rb").read()
    ]
    data = bytearray(open(file, "rb").read())
    at = data.index(needle) + 9
    data[at] ^= 0x10
    open(file, "wb").write(bytes(data))
    other_model, other = _trained(seed=3)
    before = _snapshot(other_model, other)
    with pytest.raises(ValueError, match="does not match its checksum") as refused:
        load_checkpoint(path, other_model, other)
    assert _same(before, _snapshot(other_model, other))  # the model too: loaded after
    row["happened"] = f"refused: {str(refused.value).split(':')[0]}; nothing changed"


def test_state_saved_without_checksums_still_loads(tmp_path):
    model, opt = _trained()
    sd = opt.state_dict()
    for state in sd["state"].values():
        for key in [k for k in state if k.endswith(".checksum")]:
            del state[key]
    other_model, other = _trained(seed=3)
    other.load_state_dict(sd)
    for p, q in zip(opt.state, other.state, strict=True):
        for key, value in opt.state[p].items():
            if isinstance(value, torch.Tensor):
                assert torch.equal(value, other.state[q][key]), key


def test_a_dcp_checkpoint_written_before_checksums_still_loads(tmp_path, monkeypatch):
    """Written without the checksum entries (as before them): torch's loader finds no such
    keys, and the state loads as saved."""
    import sharded_shampoo.state.dicts as dicts

    model, opt = _trained()
    path = str(tmp_path / "ckpt")
    with monkeypatch.context() as m:
        m.setattr(dicts, "add_checksums", lambda state: None)
        m.setattr(
            opt._dicts,
            "_base",
            lambda base=opt._dicts._base: _without_checksums(base()),
        )
        save_checkpoint(path, model, opt)
    other_model, other = _trained(seed=3)
    load_checkpoint(path, other_model, other)
    for p, q in zip(opt.state, other.state, strict=True):
        for key, value in opt.state[p].items():
            if isinstance(value, torch.Tensor) and not key.endswith(".checksum"):
                assert torch.equal(value, other.state[q][key]), key


def _without_checksums(sd):
    sd["state"] = {
        k: {n: v for n, v in s.items() if not n.endswith(".checksum")}
        for k, s in sd["state"].items()
    }
    return sd
