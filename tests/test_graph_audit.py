"""rollout/graph_audit.py on the CPU: an in-place refit keeps every pointer and changes every
digest; a re-allocated parameter, a replaced buffer, a new attribute and a tied alias are each
seen."""

from __future__ import annotations

import torch

from rollout.graph_audit import GraphAudit, compare, digests, snapshot


def model() -> torch.nn.Module:
    torch.manual_seed(0)
    m = torch.nn.Sequential(
        torch.nn.Embedding(50, 16), torch.nn.LayerNorm(16), torch.nn.Linear(16, 50, bias=False)
    )
    m[2].weight = m[0].weight  # a tied head: one Parameter under two names
    m.register_buffer("cos_sin", torch.randn(8, 4))
    m[1].scale = torch.ones(3)  # a plain tensor attribute, as vLLM's kernels keep some
    return m


def refit_in_place(m: torch.nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=gen))


def test_in_place_refit_keeps_pointers_and_changes_every_parameter():
    m = model()
    start = snapshot(m)
    assert {start["0.weight"].kind, start["cos_sin"].kind, start["1.scale"].kind} == {
        "parameter",
        "buffer",
        "attribute",
    }
    assert start["2.weight"].ptr == start["0.weight"].ptr  # the alias is recorded under both names
    refit_in_place(m, 1)
    report = compare(start, start, snapshot(m))
    assert (
        report["moved"]
        == report["missing"]
        == report["added"]
        == report["unchanged_parameters"]
        == []
    )
    assert (
        report["changed"] == 4
    )  # 0.weight (and its alias 2.weight), 1.weight, 1.bias; not the buffer
    audit = GraphAudit.of([report])
    assert audit.keeps_pointers and audit.tensors == len(start)


def test_a_reallocated_parameter_and_a_replaced_buffer_are_named():
    m = model()
    start = snapshot(m)
    m[1].weight.data = m[
        1
    ].weight.data.clone()  # same values, a fresh storage: a graph would read the old one
    m.cos_sin = m.cos_sin.clone()
    m[1].new_scale = torch.zeros(2)
    report = compare(start, start, snapshot(m))
    assert report["moved"] == ["1.weight", "cos_sin"]
    assert report["added"] == ["1.new_scale"] and report["changed"] == 0
    assert "1.weight" in report["unchanged_parameters"]
    assert not GraphAudit.of([report]).keeps_pointers


def test_a_reshaped_view_on_the_same_storage_counts_as_moved():
    m = model()
    start = snapshot(m)
    m.cos_sin = m.cos_sin.view(4, 8)  # same pointer, another shape: kernels captured the old one
    assert compare(start, start, snapshot(m))["moved"] == ["cos_sin"]


def test_digest_is_position_sensitive_and_sees_one_bit():
    x = torch.arange(12, dtype=torch.float32)
    swapped = x.clone()
    swapped[[0, 1]] = swapped[[1, 0]]
    flipped = x.clone()
    flipped.view(torch.int32)[5] ^= 1
    odd = torch.arange(7, dtype=torch.uint8)  # not a multiple of 4 bytes
    a, b, c, d, e = digests([x, swapped, flipped, odd, x.clone()])
    assert len({a, b, c, d}) == 4 and a == e


def test_two_workers_are_named_apart():
    r = {
        "tensors": 2,
        "moved": ["a"],
        "missing": [],
        "added": [],
        "changed": 1,
        "unchanged_parameters": [],
    }
    audit = GraphAudit.of([r, {**r, "moved": []}])
    assert audit.moved == ("w0:a",) and audit.tensors == 4 and audit.changed == 2
