"""`backend="zipvl"` works without importing zipvl_compile first (the torch_dynamo_backends entry point)."""

import subprocess
import sys

SCRIPT = """
import sys, torch
import transformers as T
cfg = T.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                    num_attention_heads=2, num_key_value_heads=1, head_dim=16)
model = T.LlamaForCausalLM(cfg).eval()
assert "zipvl_compile" not in sys.modules
ids = torch.randint(0, 64, (1, 6))
expected = model(input_ids=ids).logits
model.compile(backend="zipvl", options={"inner": "eager", "tau": 1.0})
got = model(input_ids=ids).logits
torch.testing.assert_close(got, expected)
import zipvl_compile
print(sum(s.rewritten for s in zipvl_compile.report().sites))
"""


def test_backend_by_name_without_import():
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "1"
