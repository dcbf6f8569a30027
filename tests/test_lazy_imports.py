"""The quantization libraries stay out of ``import lorakit`` and the CLI start, and out of the CLI's output.

Checked in a fresh interpreter (``sys.modules`` of the test process already holds everything).
"""

from __future__ import annotations

import json
import subprocess
import sys

CODE = """
import json, sys
import lorakit, lorakit.cli, lorakit.models, lorakit.core.quant
at_import = sorted(m for m in ('torchao', 'bitsandbytes') if m in sys.modules)
lorakit.cli.main(['methods'])  # the logging set-up every command runs
from transformers import LlamaConfig, LlamaForCausalLM  # what loading any model imports
LlamaForCausalLM(LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                             num_key_value_heads=1, vocab_size=32))
print(json.dumps([at_import, 'torchao' in sys.modules]))
"""


def test_cli_imports_no_quantization_library_and_prints_no_torchao_noise() -> None:
    """``import lorakit.cli`` imports neither torchao nor bitsandbytes; transformers imports torchao (when
    installed) as soon as a model class loads, and its import-time warnings (kernels it cannot load, torch's
    pytree deprecation) do not reach a lorakit command's output."""
    result = subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    at_import, torchao_after_model = json.loads(result.stdout.splitlines()[-1])
    assert at_import == []
    assert torchao_after_model  # imported by transformers, yet silent:
    assert "torchao" not in result.stderr and "register_constant" not in result.stderr, result.stderr
