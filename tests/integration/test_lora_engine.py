"""vLLM's CPU build serves a LoRA adapter written by trainers/lora.py: the engine's log-probs through the adapter
equal the merged model's (transformers), and differ from the base model's. This is what an adapter-only weight
sync rests on, and what a canary on the adapter path can tell apart."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration]
pytest.importorskip("peft")

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = textwrap.dedent("""
    import json, sys
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trainers.lora import adapter_files, apply_lora, merged_state_dict, write_adapter

    if __name__ == "__main__":
        base, out = sys.argv[1], sys.argv[2]
        tok = AutoTokenizer.from_pretrained(base)
        model = apply_lora(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), rank=8, alpha=16)
        torch.manual_seed(0)
        for name, p in model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.05)
        write_adapter(adapter_files(model), out + "/adapter")
        ids = tok("Problem: Compute 12 + 35.\\nSolution:\\n")["input_ids"]
        full = ids + tok(" 12 + 35 = 47")["input_ids"]
        ref = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
        ref.load_state_dict(merged_state_dict(model), strict=False)
        with torch.no_grad():
            lp = torch.log_softmax(ref(torch.tensor([full])).logits[0].float(), -1)
        merged = [lp[i - 1, full[i]].item() for i in range(len(ids), len(full))]

        from vllm import LLM, SamplingParams
        from vllm.lora.request import LoRARequest

        llm = LLM(model=base, dtype="float32", enable_lora=True, max_lora_rank=8, max_model_len=128,
                  enforce_eager=True, gpu_memory_utilization=0.15)
        sp = SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=1.0)
        def prompt_lps(**kw):
            o = llm.generate([{"prompt_token_ids": full}], sp, use_tqdm=False, **kw)[0]
            return [next(iter(d.values())).logprob for d in o.prompt_logprobs[len(ids):]]
        lora = prompt_lps(lora_request=LoRARequest("policy", 1, out + "/adapter"))
        plain = prompt_lps()
        with open(out + "/result.json", "w") as f:
            json.dump({"merged": merged, "lora": lora, "base": plain}, f)
        # the answer is written: stop the engine's processes and leave without vLLM's interpreter-exit shutdown,
        # which is not under test here (on a loaded machine it was seen to abort after the work was done)
        import os, psutil
        for child in psutil.Process().children(recursive=True):
            child.kill()
        os._exit(0)
""")


def test_cpu_engine_serves_the_adapter_as_the_merged_model(tiny_model_dir, tmp_path):
    (tmp_path / "probe.py").write_text(SCRIPT)
    log = tmp_path / "probe.log"
    with open(log, "w") as out:  # a file, not a pipe: an engine process left behind cannot hold the test open
        proc = subprocess.Popen([sys.executable, str(tmp_path / "probe.py"), tiny_model_dir, str(tmp_path)],
                                cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            code = proc.wait(timeout=900)
        finally:
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # whatever is left of its process group
            except ProcessLookupError:
                pass
    assert code == 0 and (tmp_path / "result.json").is_file(), (code, log.read_text()[-4000:])
    r = json.loads((tmp_path / "result.json").read_text())
    assert len(r["merged"]) == len(r["lora"]) == len(r["base"]) >= 5
    gap = max(abs(a - b) for a, b in zip(r["merged"], r["lora"]))
    base_gap = max(abs(a - b) for a, b in zip(r["merged"], r["base"]))
    assert gap < 1e-4, (gap, r)  # measured 6.7e-6 in float32
    assert base_gap > 100 * gap and base_gap > 0.05, (base_gap, r)  # measured 0.89: the adapter is what differs
