"""What the server tests share: a tiny chat model saved to a folder (random Llama with a small byte-level BPE and
SmolLM2's chat template; no downloads), and the library reference a server's replies must equal."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from sinkcache import SinkCache, enable_streaming

# SmolLM2-135M-Instruct's template without its default system prompt (the conversation's structure is the same)
CHAT_TEMPLATE = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
                 "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
                 "{% endif %}")
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # ids 0 (padding), 1, 2 (end of turn)
WORDS = ("the cache keeps the first tokens of a stream and a window of recent ones so that a model can read "
         "forever at constant memory while every token sees positions inside the cache").split()


def user_message(client: int, turn: int) -> str:
    """A deterministic user turn, different for every client and turn."""
    pick = torch.randint(0, len(WORDS), (3 + (client + turn) % 5,), generator=torch.Generator().manual_seed(
        1000 * client + turn))
    return f"[{client}.{turn}] " + " ".join(WORDS[i] for i in pick.tolist()) + "?"


def build_tiny_chat_model(folder: Path) -> Path:
    """Save a tiny random Llama (vocabulary 384, 2 layers, initializer range 0.15 so that position bugs show) and
    its tokenizer into ``folder``; a few seconds."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from sinkcache import offline

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator([offline.default_text()[:40_000], " ".join(WORDS)], trainers.BpeTrainer(
        vocab_size=384, special_tokens=SPECIAL, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                        bos_token="<|im_start|>")
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(folder)
    config = AutoConfig.for_model(
        "llama", vocab_size=bpe.get_vocab_size(), hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096, initializer_range=0.15,
        pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    return folder


def load_tiny(folder: Path, window: int, sinks: int):
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    return enable_streaming(model, window, sinks), AutoTokenizer.from_pretrained(folder)


class ReferenceChat:
    """A conversation through the library alone, as a user of it would write it: one SinkCache, and each turn
    ``model.generate`` on the whole conversation's ids (the ids so far, the reply's ids as generated, then the
    tokens of what the chat template adds), greedy. ``ask`` returns the reply's text and the prompt's size."""

    def __init__(self, model, tokenizer, window: int, sinks: int, max_tokens: int, template: bool = True):
        self.model, self.tokenizer, self.max_tokens, self.template = model, tokenizer, max_tokens, template
        self.cache = SinkCache(window, sinks)
        self.ids: list[int] = []
        self.text = ""
        self.messages: list[dict[str, str]] = []

    def ask(self, message: str) -> tuple[str, int, int]:
        """The reply to ``message`` (a user turn, or the text to append for completions), its prompt's token
        count and the tokens the cache had already consumed."""
        if self.template:
            self.messages.append({"role": "user", "content": message})
            full = self.tokenizer.apply_chat_template(self.messages, add_generation_prompt=True, tokenize=False)
        else:
            full = self.text + message
        assert full.startswith(self.text)
        ids = self.ids + self.tokenizer(full[len(self.text):], add_special_tokens=False)["input_ids"]
        prompt = torch.tensor([ids])
        seen = self.cache.seen
        out = self.model.generate(prompt, attention_mask=torch.ones_like(prompt), cache=self.cache,
                                  max_new_tokens=self.max_tokens, do_sample=False, pad_token_id=2)
        reply = out[0, len(ids):].tolist()
        if reply and reply[-1] == 2:  # the end-of-turn token is not part of the reply
            reply = reply[:-1]
        text = self.tokenizer.decode(reply, skip_special_tokens=False, clean_up_tokenization_spaces=False)
        self.ids, self.text = ids + reply, full + text
        self.messages.append({"role": "assistant", "content": text})
        return text, len(ids), seen


def fresh_reply(model, tokenizer, prompt_text: str, window: int, sinks: int, max_tokens: int) -> str:
    """The reply to a whole prompt prefilled into a new SinkCache: what a request that continues no session gets."""
    chat = ReferenceChat(model, tokenizer, window, sinks, max_tokens, template=False)
    return chat.ask(prompt_text)[0]
