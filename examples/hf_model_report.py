"""A Hugging Face model through ``torch.compile(backend="attnfuse")``, with its report.

    python examples/hf_model_report.py [--inner inductor|aot_eager|eager] [--report-dir attnfuse_report]

Builds a small Llama from its config (random weights, no download) with eager attention,
compiles it with the attnfuse backend, checks the result against eager, prints what was
fused (file:line and module of each attention site) and writes one JSON and one HTML report
per compiled graph to ``--report-dir``. Needs ``pip install transformers``.
"""
import argparse

import torch
import transformers

import attnfuse


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--inner", default="inductor", choices=("inductor", "aot_eager", "eager"))
    parser.add_argument("--report-dir", default="attnfuse_report")
    args = parser.parse_args(argv)

    config = transformers.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    input_ids = torch.randint(0, 256, (2, 32))

    compiled = torch.compile(model, backend="attnfuse", options={"inner": args.inner, "report": args.report_dir})
    with torch.no_grad():
        logits = compiled(input_ids).logits
        torch.testing.assert_close(logits, model(input_ids).logits, atol=1e-4, rtol=1e-4)
    report = attnfuse.last_report()
    print(report.to_text())
    print(f"reports written to {args.report_dir}/")
    return report


if __name__ == "__main__":
    main()
