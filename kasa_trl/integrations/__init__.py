"""Thin glue between kasa_trl and other tools: ``kasa_trl.integrations.peft`` (PEFT and plain-LoRA exports).

Integrations import the library; the library's modules never import them (only the command line, the layer above,
does: docs/design.md section 3). Accelerate configurations and the vLLM guide, which hold no Python, live in the
repository's top-level ``integrations/`` folder.
"""
