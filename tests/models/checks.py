"""The checks the self-attention family tests share, against references from transformers' own model; each family
passes what it does its own way (its features, its positions) and asserts its own counts after. Their fixtures are
in conftest.py."""

import json

import torch
from kvcheck import expected_kv, measured_kv
from reference import REPO, holed_mask, hooked, masked_layer_hooks, no_hooks_left, plan, shortened_embeds

import vtprune
from vtprune.models.base import left_pad_positions

PROMPTS = ["What is shown?", "How many objects are there in the picture please?"]


def sdpa_adapter(family, class_name):
    """The family's tiny model on the CPU in float32 with sdpa attention; the references' eager copies are made from
    it."""
    a = vtprune.load(model=f"tiny:{family}", device="cpu", dtype="float32", attn_implementation="sdpa").adapter
    assert type(a).__name__ == class_name and a.model.dtype == torch.float32
    assert a.model.config._attn_implementation == "sdpa"
    return a


def keep_all(adapter, inputs, name, **options):
    """Keeping every token gives the unpruned logits; returns those and the records."""
    with torch.no_grad():
        ref, _ = adapter.prefill_logits(inputs, plan("none"))
        logits, records = adapter.prefill_logits(inputs, plan(name, 1.0, **options))
    torch.testing.assert_close(logits, ref, atol=1e-5, rtol=1e-5)
    return ref, records


def pre_llm_equals_shortened(adapter, inputs, gen, name, counts, features):
    """Pre-LLM pruning at keep 0.5 (prefill and generate) equals the LLM run on the shortened sequence, built from
    ``features(adapter, inputs)``: each sample's projector outputs from transformers' own functions."""
    p = plan(name, 0.5)
    with torch.no_grad():
        logits, records = adapter.prefill_logits(inputs, p)
        new, gen_records = adapter.generate(inputs, p, **gen)
        kept = [r.kept for r in records]
        batch, mask = shortened_embeds(adapter, inputs, kept, features(adapter, inputs))
        positions = left_pad_positions(mask)
        ref = adapter.model(inputs_embeds=batch, attention_mask=mask, position_ids=positions).logits[:, -1]
        ref_new = adapter.model.generate(inputs_embeds=batch, attention_mask=mask, **gen)
        unpruned, _ = adapter.prefill_logits(inputs, plan("none"))
    assert [r.num_kept for r in records] == [c // 2 for c in counts]
    assert [r.kept for r in gen_records] == kept
    torch.testing.assert_close(logits, ref, atol=1e-5, rtol=1e-5)
    assert (logits - unpruned).abs().max() > 1e-3  # the pruning does change the output
    assert torch.equal(new, ref_new)
    assert torch.equal(new[:, 0], logits.argmax(-1))


def fastv_equals_masked(adapter, inputs, gen, counts, positions):
    """fastv at layer 2, keep 0.5 (prefill and generate) equals the full sequence with the pruned image tokens hidden
    from layers 2.. on; ``positions(adapter, inputs)``: the prompt's positions as transformers computes them."""
    k = 2
    p = plan("fastv", 0.5, layer=k)
    with torch.no_grad():
        logits, records = adapter.prefill_logits(inputs, p)
        new, gen_records = adapter.generate(inputs, p, **gen)
        assert no_hooks_left(adapter)
        kept = [r.kept for r in records]
        with hooked(masked_layer_hooks(adapter.decoder_layers, holed_mask(adapter, inputs, kept), k)):
            ref = adapter.model(**inputs, position_ids=positions(adapter, inputs)).logits[:, -1]
            ref_new = adapter.model.generate(**inputs, **gen)[:, inputs["input_ids"].shape[1] :]
        unpruned, _ = adapter.prefill_logits(inputs, plan("none"))
    torch.testing.assert_close(logits, ref, atol=1e-5, rtol=1e-5)
    assert (logits - unpruned).abs().max() > 1e-3
    assert [r.kept for r in gen_records] == kept
    assert torch.equal(new, ref_new)
    layers = len(adapter.decoder_layers)
    assert [r.num_kept for r in records] == [c // 2 for c in counts]
    assert all(r.equivalent_tokens == (k * r.num_visual + (layers - k) * r.num_kept) / layers for r in records)


def batched_equals_per_sample(adapter, inputs, gen, p, images):
    """Each sample of the batch keeps, scores and generates as it does alone; returns the batch's records and each
    sample's own (its prepared inputs, its record)."""
    with torch.no_grad():
        logits, records = adapter.prefill_logits(inputs, p)
        new, gen_records = adapter.generate(inputs, p, **gen)
        alone = []
        for b in range(len(images)):
            one = adapter.prepare(images[b : b + 1], PROMPTS[b : b + 1])
            one_logits, one_records = adapter.prefill_logits(one, p)
            one_new, one_gen = adapter.generate(one, p, **gen)
            assert one_records[0].kept == one_gen[0].kept == records[b].kept == gen_records[b].kept
            assert one_records[0].merged == records[b].merged
            torch.testing.assert_close(one_logits[0], logits[b], atol=1e-4, rtol=1e-4)
            assert torch.equal(one_new[0], new[b])
            alone.append((one, one_records[0]))
    assert torch.equal(new[:, 0], logits.argmax(-1))
    return records, alone


def pre_llm_cache(adapter, inputs, sizes):
    """Pre-LLM pruning at keep 0.5 caches, in every layer, the kept and text tokens of the longest pruned sample;
    ``sizes``: each sample's (visual, kept) tokens. Returns each sample's unpadded prompt length."""
    with torch.no_grad():
        spliced, records = adapter.spliced(inputs, plan("uniform", 0.5))
        out = adapter.model(**spliced, use_cache=True)
    valid = inputs["attention_mask"].sum(dim=1).tolist()
    lengths = [v - r.num_visual + r.num_kept for v, r in zip(valid, records)]  # text + kept per sample
    assert [(r.num_visual, r.num_kept) for r in records] == sizes
    assert max(lengths) < max(valid)
    assert [layer.keys.shape[-2] for layer in out.cache.layers] == [max(lengths)] * 4
    assert [layer.values.shape[-2] for layer in out.cache.layers] == [max(lengths)] * 4
    return valid


def fastv_cache(adapter, inputs, sizes, positions):
    """fastv at layer 2 caches the whole prompt in layers 0-1, then the kept and text tokens of the longest sample."""
    k = 2
    with torch.no_grad(), adapter.applied(inputs, plan("fastv", 0.5, layer=k)) as state:
        out = adapter.model(**inputs, position_ids=positions(adapter, inputs), use_cache=True)
    full = inputs["input_ids"].shape[1]
    valid = inputs["attention_mask"].sum(dim=1).tolist()
    short = max(v - r.num_visual + r.num_kept for v, r in zip(valid, state.records))
    assert [(r.num_visual, r.num_kept) for r in state.records] == sizes
    assert short == state.gather.shape[1] < full
    assert [layer.keys.shape[-2] for layer in out.cache.layers] == [full] * k + [short] * (4 - k)
    assert no_hooks_left(adapter)


def synthetic_kv(adapter, name, prompt_tokens, positions=None):
    """A bench's synthetic batch of two (``prompt_tokens``, ``n`` image tokens each) pruned by ``name`` to n // 2:
    fastv caches that from layer 2 on, and the cache holds the bytes vtprune.bench accounts for. ``positions(batch)``:
    the position ids of fastv's run on the whole prompt where the model does not compute them itself. Returns the
    batch."""
    p = plan(name, 0.5)
    synthetic = adapter.synthetic_inputs(2, prompt_tokens, torch.Generator().manual_seed(0))
    n = adapter.num_synthetic_visual()
    text = synthetic["input_ids"].shape[1] - n
    assert (synthetic["input_ids"] == adapter.image_token_id).sum(dim=1).tolist() == [n, n]
    with torch.no_grad():
        if name == "fastv":
            position_ids = positions(synthetic) if positions else None
            with adapter.applied(synthetic, p) as state:
                out = adapter.model(**synthetic, position_ids=position_ids, use_cache=True)
            records = state.records
            assert [layer.keys.shape[-2] for layer in out.cache.layers][2:] == [text + n // 2] * 2
        else:
            spliced, records = adapter.spliced(synthetic, p)
            out = adapter.model(**spliced, use_cache=True)
    assert [r.num_kept for r in records] == [n // 2] * 2
    expected = expected_kv(adapter, p, batch_size=2, text_tokens=text, num_visual=n, num_kept=n // 2)
    assert measured_kv(adapter, out.cache) == expected
    return synthetic


def pipeline_generates(family, image, num_visual):
    """``vtprune.load`` of the family's tiny model generates for one image, keeping all of its visual tokens."""
    out = vtprune.load(model=f"tiny:{family}").generate([image], PROMPTS[:1], max_new_tokens=2)
    assert out[0].num_visual == num_visual and out[0].kept == list(range(num_visual))


def architecture_cost(arch, family, n):
    """``vtprune bench``'s cost rows for configs/architectures/<arch>.yaml (random weights, ``n`` visual tokens):
    the KV bytes its config.json gives, and a TTFT speed-up below the ideal; returns the rows by (strategy, keep,
    batch size)."""
    from vtprune.bench import cost_for_config
    from vtprune.config import load_config

    config = load_config(REPO / f"configs/architectures/{arch}.yaml")
    assert config.model.weights == "random"
    rows = cost_for_config(config, batch_sizes=[1, 8], ratios=[1.0, 0.25], strategies=["none", "uniform", "fastv"])
    text = json.loads((REPO / f"configs/architectures/{arch}/config.json").read_text())["text_config"]
    layers, kv_heads = text["num_hidden_layers"], text["num_key_value_heads"]
    head_dim = text["hidden_size"] // text["num_attention_heads"]
    assert (layers, kv_heads, head_dim) == (28, 4, 128)
    assert all(r["num_visual"] == n and r["family"] == family for r in rows)
    by = {(r["strategy"], r["keep_ratio"], r["batch_size"]): r for r in rows}
    per_token = 2 * layers * kv_heads * head_dim * 2  # K and V, bf16
    prompt = config.bench.prompt_tokens
    assert by[("none", 1.0, 1)]["kv_bytes"] == per_token * (n + prompt)
    assert by[("uniform", 0.25, 8)]["kv_bytes"] == 8 * per_token * (-(-n // 4) + prompt)
    assert by[("uniform", 0.25, 1)]["num_kept"] == -(-n // 4)
    assert 1 < by[("uniform", 0.25, 1)]["ideal_ttft_speedup"] < 4
    return by
