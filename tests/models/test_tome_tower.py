"""Merging inside the vision tower (tome on LLaVA): what reaches the LLM is transformers' own CLIP layers run on
the survivors, merged between attention and MLP as the strategy selects, projected, each in its own slot."""

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
