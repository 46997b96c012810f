"""GGUF files: lazy reading, GGML block decoding (torch, and Triton on CUDA), test quantisers."""

from .dequant import BLOCK_DECODERS, QUANTISED, dequantize, packed_nbytes
from .reader import GGUFSource, codec_name, storage_name, summary

__all__ = ["BLOCK_DECODERS", "GGUFSource", "QUANTISED", "codec_name", "dequantize", "packed_nbytes",
           "storage_name", "summary"]
