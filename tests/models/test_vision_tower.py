"""Selecting inside the vision tower (tome, flowcut on LLaVA): what reaches the LLM is transformers' own CLIP layers
run on the survivors — merged between attention and MLP (tome) or cut after the whole layer (flowcut) as the strategy
selects — projected, each in its own slot."""

import pytest
import torch
from PIL import Image
from reference import plan

import vtprune
from vtprune.models.llava import _vision_layers
from vtprune.strategies import STRATEGIES, Signals
from vtprune.strategies.tome import schedule

pytestmark = pytest.mark.usefixtures("one_thread")


def reference_features(adapter, pixel_values, keep_ratio):
    """Each crop's survivors (patch indices) and their projector outputs, from the tower's parts in a plain loop."""
    tower = adapter.model.model.vision_tower
    model = getattr(tower, "vision_model", tower)
    layers = _vision_layers(tower)
    index = adapter.feature_layer_index()
    hidden = model.pre_layrnorm(model.embeddings(pixel_values))
    crops, length, _ = hidden.shape
    origin = torch.arange(length).expand(crops, -1)
    counts = schedule(length - 1, keep_ratio, index + 1)
    for i in range(index + 1):
        layer = layers[i]
        x = layer.layer_norm1(hidden)
        out, _ = layer.self_attn(hidden_states=x)
        hidden = hidden + out
        attn = layer.self_attn
        keys = attn.k_proj(x).view(crops, length, attn.num_heads, attn.head_dim).mean(dim=2)
        rows, origins = [], []
        for c in range(crops):
            valid = torch.ones(1, length, dtype=torch.bool)
            valid[0, 0] = False
            (sel,) = STRATEGIES.get("tome").selections(Signals(valid=valid, vision_keys=keys[c : c + 1]), keep_ratio,
                                                       torch.tensor([counts[i]]))
            vectors = hidden[c].clone()
            vectors[sel.anchors] = sel.weights @ hidden[c]
            keep = torch.cat([torch.zeros(1, dtype=torch.long), sel.slots])
            rows.append(vectors[keep])
            origins.append(origin[c][keep])
        hidden, origin = torch.stack(rows), torch.stack(origins)
        hidden = hidden + layer.mlp(layer.layer_norm2(hidden))
        length = hidden.shape[1]
    projected = adapter.model.model.multi_modal_projector(hidden[:, 1:])  # the default strategy drops the CLS
    return origin[:, 1:] - 1, projected


def test_tome_reaches_the_llm_as_the_towers_own_layers_on_the_survivors():
    adapter = vtprune.load(model="tiny:llava", device="cpu", dtype="float32").adapter
    g = torch.Generator().manual_seed(3)
    images = [Image.fromarray((torch.rand(56, 56, 3, generator=g) * 255).to(torch.uint8).numpy()) for _ in range(2)]
    inputs = adapter.prepare(images, ["What is shown?", "How many objects are there in the picture please?"])
    with torch.no_grad():
        spliced, records = adapter.spliced(inputs, plan("tome", 0.3))
        survivors, projected = reference_features(adapter, inputs["pixel_values"], 0.3)
    ids, mask = inputs["input_ids"], inputs["attention_mask"].bool()
    for b, record in enumerate(records):
        assert record.kept == survivors[b].tolist() and len(record.kept) == 5 == -(-16 * 3 // 10)
        assert record.merged and set(record.merged) < set(record.kept)
        image_pos = torch.nonzero(ids[b] == adapter.image_token_id).flatten()
        stay = mask[b].clone()
        stay[image_pos] = False
        stay[image_pos[survivors[b]]] = True
        row = spliced["inputs_embeds"][b][spliced["attention_mask"][b].bool()]
        place = {int(p): i for i, p in enumerate(torch.nonzero(stay).flatten())}
        got = torch.stack([row[place[int(image_pos[k])]] for k in survivors[b]])
        torch.testing.assert_close(got, projected[b], atol=1e-5, rtol=1e-5)
    # the vision tower's layers are CLIP's own again afterwards
    assert all("forward" not in vars(layer) for layer in _vision_layers(adapter.model.model.vision_tower))


def reference_flowcut(adapter, pixel_values, keep_ratio):
    """One crop's survivors and projector outputs, FlowCut selecting after each whole CLIP layer on signals computed
    here from the layer's own projections (eager formulas)."""
    from vtprune.strategies import budget

    tower = adapter.model.model.vision_tower
    model = getattr(tower, "vision_model", tower)
    layers = _vision_layers(tower)
    index = adapter.feature_layer_index()
    hidden = model.pre_layrnorm(model.embeddings(pixel_values))
    origin, carry = torch.arange(hidden.shape[1]), None
    target = torch.tensor([budget(hidden.shape[1] - 1, keep_ratio)])
    for i in range(index + 1):
        layer, attn = layers[i], layers[i].self_attn
        x = layer.layer_norm1(hidden)
        out, _ = attn(hidden_states=x)
        hidden = hidden + out
        hidden = hidden + layer.mlp(layer.layer_norm2(hidden))
        t = x.shape[1]
        q, k, v = (p(x).view(1, t, attn.num_heads, attn.head_dim).transpose(1, 2) for p in (attn.q_proj, attn.k_proj, attn.v_proj))
        valid = torch.ones(1, t, dtype=torch.bool)
        valid[0, 0] = False
        signals = Signals(valid=valid,
                          vision_layer_attention=torch.softmax(q[:, :, :1] @ k.transpose(-1, -2) * attn.scale, -1).mean(1)[:, 0],
                          vision_semantic=torch.softmax(v[:, :, :1] @ v.transpose(-1, -2), -1).mean(1)[:, 0],
                          vision_values=v.mean(1), stage=i, stages=index + 1, carry=carry)
        (sel,) = STRATEGIES.get("flowcut").selections(signals, keep_ratio, target)
        keep = torch.cat([torch.zeros(1, dtype=torch.long), sel.slots])
        hidden, origin, carry = hidden[:, keep], origin[keep], sel.carry[keep][None]
    return origin[1:] - 1, adapter.model.model.multi_modal_projector(hidden[0, 1:])


def test_flowcut_reaches_the_llm_as_the_towers_own_layers_on_the_survivors():
    adapter = vtprune.load(model="tiny:llava", device="cpu", dtype="float32").adapter
    g = torch.Generator().manual_seed(4)
    images = [Image.fromarray((torch.rand(56, 56, 3, generator=g) * 255).to(torch.uint8).numpy()) for _ in range(2)]
    inputs = adapter.prepare(images, ["What is shown?", "How many objects are there in the picture please?"])
    with torch.no_grad():
        spliced, records = adapter.spliced(inputs, plan("flowcut", 0.3))
    ids, mask = inputs["input_ids"], inputs["attention_mask"].bool()
    for b, record in enumerate(records):
        with torch.no_grad():
            survivors, projected = reference_flowcut(adapter, inputs["pixel_values"][b : b + 1], 0.3)
        assert record.kept == survivors.tolist() and len(record.kept) == 5 and record.merged == []
        image_pos = torch.nonzero(ids[b] == adapter.image_token_id).flatten()
        stay = mask[b].clone()
        stay[image_pos] = False
        stay[image_pos[survivors]] = True
        row = spliced["inputs_embeds"][b][spliced["attention_mask"][b].bool()]
        place = {int(p): i for i, p in enumerate(torch.nonzero(stay).flatten())}
        got = torch.stack([row[place[int(image_pos[k])]] for k in survivors])
        torch.testing.assert_close(got, projected, atol=1e-5, rtol=1e-5)
