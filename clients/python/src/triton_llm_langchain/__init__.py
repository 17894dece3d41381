"""LangChain chat model for the seed interface of libtriton_llm.so (Triton, over gRPC)."""

from triton_llm_langchain.chat_models import ChatTritonLLM, TritonLLMError, seed_fields

__all__ = ["ChatTritonLLM", "TritonLLMError", "seed_fields"]
