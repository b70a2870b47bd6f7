"""The file stage: a GGUF file mapped read-only (:mod:`.file`: metadata, tensor directory, one
:class:`~rosenblatt.errors.ModelFileError` for anything unusable) and the block formats of its
quantized tensors (:mod:`.quants`: decoders bit-exact with ggml's)."""
