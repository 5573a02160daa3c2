"""Thin glue between kasa_trl and other tools: ``kasa_trl.integrations.peft`` (PEFT and plain-LoRA exports).

The top of the dependency graph: integrations import the library, the library's modules never import them (the
command line, at the same level, does). Accelerate configurations and the vLLM guide, which hold no Python, live in
the repository's top-level ``integrations/`` folder.
"""
