#!/usr/bin/env python3
"""Write a small Qwen3-MoE checkpoint directory for vLLM (copied from ../shared/device/).

By default no weights are written (serve with `--load-format dummy`; vLLM's dummy weights
give every EP rank identical expert shards, so a mixed-up move would go unseen). With
`--random-weights SEED` it also writes model.safetensors with seeded random weights that
differ per expert, for the greedy-identity test. The directory holds a real byte-level BPE
tokenizer trained here on generated text, so `vllm serve` and `vllm bench serve` work with
no network.

    python3 make_moe_model.py OUT_DIR [--layers 24] [--experts 128] [--top-k 8] [--random-weights 0]
"""
import argparse
import json
import random
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers


def write_tokenizer(out: Path, vocab_size: int) -> int:
    rng = random.Random(0)
    letters = "abcdefghijklmnopqrstuvwxyz"
    words = ["".join(rng.choice(letters) for _ in range(rng.randint(2, 9))) for _ in range(5000)]
    text = (" ".join(rng.choice(words) for _ in range(40)) + ".\n" for _ in range(20000))
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(text, trainer)
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": None, "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
        "model_max_length": 32768,
        "chat_template": ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
                          "<|im_end|>\n{% endfor %}<|im_start|>assistant\n"),
    }, indent=2))
    return tok.get_vocab_size()


def write_random_weights(out: Path, cfg: dict, seed: int) -> None:
    """model.safetensors with Hugging Face Qwen3-MoE names, N(0, 0.02) weights, unit norms."""
    import torch
    from safetensors.torch import save_file
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    gen = torch.Generator(device=dev).manual_seed(seed)
    h, hd, i = cfg["hidden_size"], cfg["head_dim"], cfg["moe_intermediate_size"]
    nh, nkv, v = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["vocab_size"]

    def rnd(*shape):
        return (torch.randn(*shape, generator=gen, device=dev) * 0.02).to(torch.bfloat16).cpu()

    def ones(n):
        return torch.ones(n, dtype=torch.bfloat16)
    t = {"model.embed_tokens.weight": rnd(v, h), "model.norm.weight": ones(h), "lm_head.weight": rnd(v, h)}
    for layer in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        t.update({p + "input_layernorm.weight": ones(h), p + "post_attention_layernorm.weight": ones(h),
                  p + "self_attn.q_proj.weight": rnd(nh * hd, h),
                  p + "self_attn.k_proj.weight": rnd(nkv * hd, h),
                  p + "self_attn.v_proj.weight": rnd(nkv * hd, h),
                  p + "self_attn.o_proj.weight": rnd(h, nh * hd),
                  p + "self_attn.q_norm.weight": ones(hd), p + "self_attn.k_norm.weight": ones(hd),
                  p + "mlp.gate.weight": rnd(cfg["num_experts"], h)})
        for e in range(cfg["num_experts"]):
            q = f"{p}mlp.experts.{e}."
            t.update({q + "gate_proj.weight": rnd(i, h), q + "up_proj.weight": rnd(i, h),
                      q + "down_proj.weight": rnd(h, i)})
    save_file(t, str(out / "model.safetensors"), metadata={"format": "pt"})


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", type=Path)
    p.add_argument("--layers", type=int, default=24)
    p.add_argument("--experts", type=int, default=128)
    p.add_argument("--top-k", type=int, default=8)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--moe-intermediate", type=int, default=768)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--random-weights", type=int, default=None, metavar="SEED",
                   help="also write seeded random weights (distinct per expert)")
    a = p.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    vocab = write_tokenizer(a.out, a.vocab)
    eos = json.loads((a.out / "tokenizer.json").read_text())["model"]["vocab"]["<|endoftext|>"]
    config = {  # Qwen3-30B-A3B's shape per layer, fewer layers by default
        "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe",
        "hidden_size": a.hidden, "intermediate_size": 6144,
        "moe_intermediate_size": a.moe_intermediate, "num_experts": a.experts,
        "num_experts_per_tok": a.top_k, "norm_topk_prob": True, "decoder_sparse_step": 1,
        "mlp_only_layers": [], "num_hidden_layers": a.layers, "num_attention_heads": a.heads,
        "num_key_value_heads": 4, "head_dim": 128, "hidden_act": "silu",
        "max_position_embeddings": 32768, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
        "vocab_size": max(vocab, a.vocab), "tie_word_embeddings": False,
        "bos_token_id": eos, "eos_token_id": eos, "torch_dtype": "bfloat16",
        "router_aux_loss_coef": 0.001, "output_router_logits": False,
    }
    (a.out / "config.json").write_text(json.dumps(config, indent=2))
    (a.out / "generation_config.json").write_text(json.dumps({"eos_token_id": eos}))
    if a.random_weights is not None:
        write_random_weights(a.out, config, a.random_weights)
    print(f"wrote {a.out}: {a.layers} layers x {a.experts} experts (top-{a.top_k}), vocab {vocab}")


if __name__ == "__main__":
    main()
