"""Local Hugging Face folders of the Llama family: import (`--config.init_from=hf:DIR`), tokenizer, export.

  config   config.json <-> the `model` section; one-line refusals outside the family (`apply` for init_from=hf:DIR).
  weights  *.safetensors (+ index) <-> the dense model's parameters, placed on the mesh tensor by tensor.
  export   a dense run (Llama layout) or a vanilla top-k MoE in every layer (Mixtral layout) -> a Hugging Face
           folder (`python -m rectify_moe.hf.export`); the Rectify routers are refused in one line.
The tokenizer.json reader is `rectify_moe.data.tokenizer` (`data.tokenizer=hf:DIR`).
"""
