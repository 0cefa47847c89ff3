"""Local Hugging Face folders of the Llama family: import (`--config.init_from=hf:DIR`), tokenizer, export.

  config   config.json <-> the `model` section; one-line refusals outside the family (`apply` for init_from=hf:DIR).
  weights  *.safetensors (+ index) <-> the dense model's parameters, placed on the mesh tensor by tensor.
  export   a dense run -> a Hugging Face folder (`python -m rectify_moe.hf.export`); MoE runs are refused.
The tokenizer.json reader is `rectify_moe.data.tokenizer` (`data.tokenizer=hf:DIR`).
"""
