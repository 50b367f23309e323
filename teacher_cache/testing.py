"""Helpers to build tiny teachers offline (tests and benchmarks): a Llama-2-format tokenizer trained on the fly.

PyTorch-side helper; never imports mlx.
"""

from __future__ import annotations


def train_llama_tokenizer(extra_corpus=(), word_pieces: bool = False):
    """A SentencePiece-style BPE tokenizer in Llama-2's tokenizer.json format (▁ metaspace via normalizer, byte
    fallback, <s> prepended), with LLaVA-1.5's added `<image>` and `<pad>`.

    word_pieces: learn merges within words only, each word's pieces starting with its `▁` (as SentencePiece trains
    Llama's: "▁the", "▁red", digits 0-9 as pieces of their own), and then run without a pre-tokenizer, exactly as
    Llama-2's tokenizer.json does. Without it (the hidden-state evidence's teacher, kept for its reproducibility)
    merges may run across spaces ("the▁")."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    from bonsai_mlx.pico import DEFAULT_CORPUS

    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    bytes_ = [f"<0x{i:02X}>" for i in range(256)]
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=["<unk>", "<s>", "</s>", *bytes_],
                                  show_progress=False, initial_alphabet=list("0123456789") if word_pieces else [])
    if word_pieces:  # split before each ▁ while training only: merges stay inside "▁word"
        tok.pre_tokenizer = pre_tokenizers.Split("▁", behavior="merged_with_next")
    corpus = list(DEFAULT_CORPUS) + list(extra_corpus) + [
        "USER: ASSISTANT: A chat between a curious human and an artificial intelligence assistant.",
        "The assistant gives helpful, detailed, and polite answers to the human's questions."]
    tok.train_from_iterator(corpus, trainer)
    tok.pre_tokenizer = None
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", tok.token_to_id("<s>"))])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   clean_up_tokenization_spaces=False)
    fast.add_tokens(["<image>"], special_tokens=True)
    fast.add_special_tokens({"pad_token": "<pad>"})
    return fast
