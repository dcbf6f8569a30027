"""The quantization libraries stay out of ``import lorakit`` and the CLI start, and out of the CLI's output.

Each check runs in a fresh interpreter (``sys.modules`` of the test process already holds everything).
"""

from __future__ import annotations

import subprocess
import sys


def python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)


def test_import_lorakit_and_its_cli_loads_no_quantization_library() -> None:
    result = python("import sys, lorakit, lorakit.cli, lorakit.models, lorakit.core.quant\n"
                    "print(sorted(m for m in ('torchao', 'bitsandbytes') if m in sys.modules))")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_cli_logging_silences_torchao_imported_by_transformers() -> None:
    """transformers imports torchao (when installed) as soon as a model class loads; its import-time warnings
    (kernels it cannot load, torch's pytree deprecation) do not reach a lorakit command's output."""
    result = python("import sys\n"
                    "from lorakit import cli\n"
                    "cli.main(['methods'])  # the logging set-up every command runs\n"
                    "from transformers import LlamaConfig, LlamaForCausalLM\n"
                    "LlamaForCausalLM(LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,\n"
                    "                             num_attention_heads=2, num_key_value_heads=1, vocab_size=32))\n"
                    "print('torchao' in sys.modules)")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1] == "True"  # imported (by transformers), yet silent:
    assert "torchao" not in result.stderr and "register_constant" not in result.stderr, result.stderr
