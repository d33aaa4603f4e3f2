"""Hugging Face checkpoint import: safetensors weights + config.json -> a model family.

``trackstar.hf.loader.load_checkpoint(dir)`` reads a ``save_pretrained`` directory (single or
sharded ``model.safetensors``, float32/float16/bfloat16) and returns an ``ImportedModel``: the
family's pure ``apply_fn`` (with the tap contract of ``trackstar.taps``), the params as a nested
dict with the family's own stable paths, the ``model`` config section and the tokenizer.

One module per architecture, found by the checkpoint's ``model_type``
(``loader.MODEL_TYPES``): ``trackstar.hf.gpt2`` (GPT-2), ``trackstar.hf.llama`` (Llama 2/3,
Mistral, Qwen2), ``trackstar.hf.neox`` (GPT-NeoX / Pythia). Each is also a model family of
``trackstar.families`` (``cfg.model.family = "gpt2"`` etc., loaded on first use), so the
training stages can build randomly initialized ones.

A family module exposes (docs/models.md, "Hugging Face checkpoints"):

- ``FAMILY``: its family name (``"gpt2"``, ``"llama"``, ``"neox"``);
- ``config_from_hf(hf_config: dict) -> ml_collections.ConfigDict``: the ``model`` config
  section (``family`` and the architecture fields, ``vocab_size`` among them, ``dtype``);
- ``params_from_hf(tensors: Mapping[str, np.ndarray], cfg_model) -> params``: the nested-dict
  params from the checkpoint's tensors through one mapping table; a missing tensor raises
  ``loader.HFImportError`` naming the Hugging Face tensor name;
- ``build(cfg_model, vocab_size, seed) -> (apply_fn, params)``: random initialization;
- ``make_apply(cfg_model, vocab_size) -> apply_fn`` (optional, recommended): the apply function
  alone, without initializing parameters (``load_checkpoint`` falls back to ``build``);
- ``TENSOR_RULES``: its tensor-parallel sharding rules (``(regex, spec)`` pairs, as
  ``trackstar.model.TENSOR_RULES``);
- ``MODEL_FAMILY = families.register_family(families.ModelFamily(name=FAMILY, build=build,
  tensor_rules=TENSOR_RULES))`` at import.

``trackstar.hf.common`` holds what the families share (activation names, ``rotate_half``, the
nnx ``build`` / ``make_apply`` / ``abstract_params`` helpers). Nothing heavy is imported here:
the family modules load lazily.
"""
