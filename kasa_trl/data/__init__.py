"""The datasets shipped with kasa_trl (``sft.jsonl``, ``dpo.jsonl``; read with ``kasa_trl.tiny.load_tiny_dataset``)
and ``make_data.py``, the deterministic script that writes them."""
