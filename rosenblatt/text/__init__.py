"""The text stage: token ids <-> text (:mod:`.tokenizer`, over the BPE merge loops of :mod:`.bpe`)
and the chat template that turns messages into a prompt (:mod:`.chat_template`)."""
