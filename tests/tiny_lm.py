"""Tiny random Hugging Face causal LMs for offline tests: a WordLevel tokenizer trained on the synthetic world's
captions and VQA words (with bos / eos / pad), and a Llama or GPT-2 config of width 64, saved with
save_pretrained into a local folder, as a user's LM folder would be."""

from __future__ import annotations

from pathlib import Path

SPECIALS = ["<pad>", "<unk>", "<s>", "</s>"]


def tiny_texts() -> list[str]:
    """Every word a synthetic caption, VQA question / answer or the default prompts use."""
    from mmfusion.data.synthetic import COLOURS, SHAPES, SIZES, TEMPLATES

    words = [
        *COLOURS,
        *SHAPES,
        *SIZES,
        "one two three yes no nothing object objects how many are there is",
        "what colour shape left of the an caption : question answer ? , : -",
    ]
    return [t.replace("{", " ").replace("}", " ") for ts in TEMPLATES.values() for t in ts] + words


def tiny_tokenizer(texts: list[str] | None = None):
    """PreTrainedTokenizerFast over a WordLevel vocabulary of `texts` (whitespace + punctuation split)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    tok.train_from_iterator(texts or tiny_texts(), trainers.WordLevelTrainer(special_tokens=SPECIALS))
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )


def tiny_lm_folder(folder: str | Path, arch: str = "llama", seed: int = 0, width: int = 64) -> Path:
    """Write a random tiny `arch` ("llama" | "gpt2") causal LM + its tokenizer into `folder`; returns it."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    tok = tiny_tokenizer()
    ids = dict(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(seed)
    if arch == "llama":
        config = LlamaConfig(
            vocab_size=len(tok),
            hidden_size=width,
            intermediate_size=2 * width,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=2,
            max_position_embeddings=128,
            **ids,
        )
        model = LlamaForCausalLM(config)
    elif arch == "gpt2":
        config = GPT2Config(vocab_size=len(tok), n_embd=width, n_layer=2, n_head=2, n_positions=128, **ids)
        model = GPT2LMHeadModel(config)
    else:
        raise ValueError(arch)
    folder = Path(folder)
    model.save_pretrained(str(folder))
    tok.save_pretrained(str(folder))
    return folder


def pretrain_tiny_lm(folder: str | Path, steps: int = 200, seed: int = 0, batch_size: int = 64) -> Path:
    """Train the LM in `folder` on synthetic-world captions alone (text-only next-token loss) and save it back:
    a tiny stand-in for a pretrained LM that already speaks the captions' language, so a captioner on top of it
    has only the grounding to learn."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mmfusion.data.synthetic import SyntheticWorld, WorldConfig, make_split

    folder = Path(folder)
    tok = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(str(folder), local_files_only=True, dtype=torch.float32)
    world = SyntheticWorld(WorldConfig(seed=seed + 1000, image_size=8))
    texts = [s["text"] for s in make_split(world, "train", steps * batch_size // 4, modalities=("text",))]
    torch.manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    model.train()
    for step in range(steps):
        batch = [texts[(step * batch_size + i) % len(texts)] for i in range(batch_size)]
        rows = [
            [tok.bos_token_id, *tok(t, add_special_tokens=False)["input_ids"], tok.eos_token_id]
            for t in batch
        ]
        width = max(map(len, rows))
        ids = torch.tensor([r + [tok.pad_token_id] * (width - len(r)) for r in rows])
        labels = torch.tensor([r + [-100] * (width - len(r)) for r in rows])
        loss = model(input_ids=ids, attention_mask=(labels != -100).long(), labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval().save_pretrained(str(folder))
    return folder
