"""Train the course's byte-level BPE tokenizer and wrap it as a Hugging Face fast tokenizer.

Byte-level BPE (as in GPT-2 and Llama 3) never produces an unknown token: any string round-trips.
8k merges suit a 4 MB corpus (about 4.4 characters per token).
"""

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

EOS = "<|endoftext|>"
VOCAB_SIZE = 8192

# The course model is a base model trained on novels, so its chat template renders a conversation as
# prose it knows how to continue: a system line, then each turn as a quoted line of dialogue.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] }}\n"
    "{% elif message['role'] == 'user' %}\"{{ message['content'] }}\" said the visitor.\n"
    "{% else %}\"{{ message['content'] }}\" replied Elizabeth.{{ eos_token }}\n{% endif %}"
    "{% endfor %}"
    '{% if add_generation_prompt %}"{% endif %}'
)


def train_tokenizer(text: str, vocab_size: int = VOCAB_SIZE) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(text.split("\n"), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=EOS,
        bos_token=EOS,
        pad_token=EOS,
        unk_token=None,
        chat_template=CHAT_TEMPLATE,
        model_max_length=512,
    )
