"""Bridges to other frameworks: Hugging Face `transformers` (extra `hf`).

`gradproj.integrations.transformers` imports transformers; the option mapping
(`hf_options`) and the target matcher (`targets`) do not, so a run spec and the tests
of the name tables work without it.
"""
