"""Loading checkpoint folders into the per-layer MoE description."""

import json

import pytest
import torch

from architectures import save_tiny
from ce_export import load
from ce_export.load import load_checkpoint
from ce_export.spec import DenseLayerSpec, MoeLayerSpec, RemovedLayerSpec, layer_from_json, layer_json
from checkpoints import demo_variant


def test_demo_checkpoint_spec(demo_ce):
    model = load_checkpoint(demo_ce)
    spec = model.spec
    assert spec.architecture == "olmoe" and spec.use_ce and spec.n_ce == 2
    assert len(spec.moe_layers) == spec.num_layers == 4
    layer = spec.moe_layers[0]
    assert (layer.num_experts, layer.top_k, layer.n_ce, layer.n_main, layer.norm_topk_prob) == (8, 4, 2, 2, False)
    weights = model.moe_weights[0]
    assert weights.gate_up.shape == (8, 128, 128) and weights.down.shape == (8, 128, 64)
    assert weights.ces.shape == (8, 3, 128)


def test_fused_and_sharded_layouts_load_the_same_weights(demo_ce, tmp_path):
    reference = load_checkpoint(demo_ce)
    for folder in (demo_variant(tmp_path / "fused", layout="fused"), demo_variant(tmp_path / "sharded", shards=3),
                   demo_variant(tmp_path / "fused_sharded", layout="fused", shards=2)):
        model = load_checkpoint(folder)
        assert model.spec.moe_layers == reference.spec.moe_layers
        for layer, weights in reference.moe_weights.items():
            for name in ("router", "gate_up", "down", "ces"):
                assert torch.equal(getattr(model.moe_weights[layer], name), getattr(weights, name)), (folder, name)
        assert model.dense_tensors.keys() == reference.dense_tensors.keys()


@pytest.mark.parametrize("family", ["olmoe", "mixtral", "qwen2_moe", "deepseek_v3"])
def test_merged_experts_read_one_part_at_a_time_as_transformers_merges_them(family, demo_ce, tmp_path, monkeypatch):
    """Per-expert checkpoints: each layer's experts are read into one preallocated tensor
    (load.stacked_reader) with exactly the values of transformers' own weight converter."""
    folder = demo_ce if family == "olmoe" else save_tiny(family, tmp_path / family)
    stacked = []
    monkeypatch.setattr(load, "stacked_reader", lambda *args, real=load.stacked_reader: stacked.append(real(*args))
                        or stacked[-1])
    lean = load_checkpoint(folder)
    assert any(stacked)  # the experts are merged, and by the lean reader
    monkeypatch.setattr(load, "stacked_reader", lambda *args: None)  # transformers' converter reads
    converted = load_checkpoint(folder)
    for layer, source in lean.moe_weights.sources.items():
        for name, stored in source.items():
            expected = dict(converted.moe_weights.sources[layer].items())[name].read()
            assert torch.equal(stored.read(), expected), (family, layer, name)


def test_plain_checkpoint_has_no_compressed_experts(demo_plain):
    model = load_checkpoint(demo_plain)
    assert not model.spec.use_ce
    assert all(layer.n_ce == 0 for layer in model.spec.moe_layers)
    assert all(weights.ces is None for weights in model.moe_weights.values())


def test_trimmed_checkpoint_per_layer_expert_counts(tmp_path):
    keep = [[0, 2, 3, 5, 7], list(range(8)), -1, [1, 4, 6, 7]]
    model = load_checkpoint(demo_variant(tmp_path / "trimmed", keep=keep))
    layers = model.spec.moe_layers
    assert [type(layer) for layer in layers] == [MoeLayerSpec, MoeLayerSpec, RemovedLayerSpec, MoeLayerSpec]
    assert [layers[i].num_experts for i in (0, 1, 3)] == [5, 8, 4]
    assert model.spec.moe_layers[3].expert_ids == (1, 4, 6, 7)
    assert model.moe_weights[3].gate_up.shape[0] == 4 and model.moe_weights[3].ces.shape[0] == 4
    assert 2 not in model.moe_weights


def test_layer_specs_round_trip_through_their_manifest_form(tmp_path):
    keep = [[0, 2, 3, 5, 7], list(range(8)), -1, [1, 4, 6, 7]]
    layers = load_checkpoint(demo_variant(tmp_path / "trimmed", keep=keep)).spec.moe_layers + (DenseLayerSpec(4),)
    written = [layer_json(layer) for layer in layers]
    assert [entry["kind"] for entry in written] == ["moe", "moe", "removed", "moe", "dense"]
    assert written[2] == {"layer": 2, "kind": "removed", "module": "model.layers.2.mlp"}
    assert written[4] == {"layer": 4, "kind": "dense"}
    assert tuple(layer_from_json(json.loads(json.dumps(entry))) for entry in written) == layers


def test_layers_of_manifests_from_before_the_layer_types_load():
    """Dense and removed layers used to carry every MoE field, zeroed."""
    zeroed = {"num_experts": 0, "hidden_size": 0, "intermediate_size": 0, "top_k": 0, "n_ce": 0,
              "routing": "softmax_topk", "expert_ids": [], "ces_width": 0}
    assert layer_from_json({"layer": 1, "kind": "dense", **zeroed, "module": ""}) == DenseLayerSpec(1)
    assert (layer_from_json({"layer": 2, "kind": "removed", **zeroed, "module": "model.layers.2.mlp"})
            == RemovedLayerSpec(2, "model.layers.2.mlp"))
    moe = layer_from_json({"layer": 0, "kind": "moe", **zeroed, "num_experts": 8, "hidden_size": 64,
                           "intermediate_size": 32, "top_k": 2, "expert_ids": [0, 1, 2, 3, 4, 5, 6, 7]})
    assert moe == MoeLayerSpec(0, 8, 64, 32, 2, expert_ids=tuple(range(8)))
    with pytest.raises(ValueError, match="kind 'ffn'"):
        layer_from_json({"layer": 0, "kind": "ffn"})
