"""Thin glue between kasa_trl and other tools (PEFT, Accelerate, vLLM).

Integrations import ``kasa_trl``; ``kasa_trl``'s library modules never import them (only the command line does).
"""
