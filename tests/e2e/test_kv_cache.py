"""The paged KV cache through a real tritonserver: prefix reuse across the rounds of a chat
gives the same answers as no reuse (and is used), a cache too small for all concurrent
requests queues them instead of failing any, and an int8 cache (quant_policy 8) and an fp8
one (kv_cache_dtype fp8) answer as the CLI does with the same cache, whatever reuse,
queueing and preemption happen."""

from concurrent.futures import ThreadPoolExecutor

import pytest

from conftest import cli_generate
from test_seed_interface import flatten, http_chat


def test_prefix_reuse_gives_the_same_answers(server):
    hits_before = server.metric("llm_prefix_cache_hit_tokens_total", "chatglm2-tiny")
    history = []
    for query in ["你好", "What is RMSNorm?", "请用一句话介绍你自己。", "hello world"]:
        fields = {"prompt": query, "history": flatten(history), "temperature": "0",
                  "max_new_tokens": "12"}
        cached = http_chat(server, "chatglm2-tiny", fields)
        uncached = http_chat(server, "chatglm2-tiny-nocache", fields)
        assert cached == uncached, query
        history = cached[1]
    # Rounds 2-4 resend the earlier rounds: their prompts start with cached blocks.
    assert server.metric("llm_prefix_cache_hit_tokens_total", "chatglm2-tiny") > hits_before
    assert server.metric("llm_prefix_cache_hit_tokens_total", "chatglm2-tiny-nocache") == 0


def test_a_full_kv_cache_queues_requests_instead_of_failing(server):
    queries = ["你好", "hello world", "What is RMSNorm?", "请用一句话介绍你自己。"]
    # Each request needs 2-4 blocks of 16 tokens; 12 concurrent ones need far more than
    # the 12 blocks the model has.
    fields = [{"prompt": q * (1 + i % 3), "temperature": "0", "max_new_tokens": "20"}
              for i, q in enumerate(queries * 3)]
    expected = [http_chat(server, "chatglm2-tiny", f) for f in fields]
    preempted_before = server.metric("llm_requests_preempted_total", "chatglm2-tiny-smallkv")
    with ThreadPoolExecutor(len(fields)) as pool:
        results = list(pool.map(lambda f: http_chat(server, "chatglm2-tiny-smallkv", f), fields))
    assert results == expected
    # Admitted sequences outgrew the free blocks: the newest gave theirs back and were
    # recomputed, with the same answers.
    assert server.metric("llm_requests_preempted_total", "chatglm2-tiny-smallkv") > preempted_before
    assert server.metric("llm_kv_blocks_used", "chatglm2-tiny-smallkv") == 0
    assert server.metric("llm_kv_blocks_free", "chatglm2-tiny-smallkv") == 12


def test_a_prompt_larger_than_the_whole_cache_is_refused(server):
    import pytest
    from tritonclient.utils import InferenceServerException
    with pytest.raises(InferenceServerException) as error:
        http_chat(server, "chatglm2-tiny-smallkv", {"prompt": "长" * 70, "max_new_tokens": "4"})
    assert "KV-cache blocks" in error.value.message()
    assert http_chat(server, "chatglm2-tiny-smallkv", {"prompt": "hi", "max_new_tokens": "4"})


@pytest.mark.parametrize("model, cache_flag", [
    ("chatglm2-tiny-kvint8", {"quant_policy": 8}),
    ("chatglm2-tiny-kvfp8", {"kv_cache_dtype": "fp8"}),
])
def test_a_quantised_kv_cache_answers_the_same_through_reuse_and_preemption(server, model,
                                                                            cache_flag):
    history = []
    for query in ["你好", "What is RMSNorm?", "hello world"]:
        fields = {"prompt": query, "history": flatten(history), "temperature": "0",
                  "max_new_tokens": "12"}
        expected = cli_generate("chatglm2-tiny", query, history, max_new_tokens=12, **cache_flag)
        answer = http_chat(server, model, fields)
        assert answer == (expected["response"], expected["history"]), query
        history = answer[1]
    assert server.metric("llm_prefix_cache_hit_tokens_total", model) > 0
    queries = ["你好", "hello world", "What is RMSNorm?", "请用一句话介绍你自己。"]
    fields = [{"prompt": q * (1 + i % 3), "temperature": "0", "max_new_tokens": "20"}
              for i, q in enumerate(queries * 3)]
    expected = [http_chat(server, model, f) for f in fields]
    preempted_before = server.metric("llm_requests_preempted_total", model)
    with ThreadPoolExecutor(len(fields)) as pool:
        results = list(pool.map(lambda f: http_chat(server, model, f), fields))
    assert results == expected
    assert server.metric("llm_requests_preempted_total", model) > preempted_before
    assert server.metric("llm_kv_blocks_used", model) == 0


def test_the_metrics_give_each_instances_weight_and_kv_bytes(server):
    # chatglm2-tiny has two instances, the others one: per instance, the int8 cache takes
    # a token in 20 bytes a head (16 values + scale + zero) against 64 in f32, and the
    # int8 linears shrink the weights.
    full = server.metric("llm_kv_bytes_per_token", "chatglm2-tiny") / 2
    int8 = server.metric("llm_kv_bytes_per_token", "chatglm2-tiny-kvint8")
    assert full > 0 and int8 * 3 < full, (full, int8)
    # fp8 heads take the same bytes as int8's (16 values + scale + a zero of 0).
    assert server.metric("llm_kv_bytes_per_token", "chatglm2-tiny-kvfp8") == int8
    dense = server.metric("llm_weight_bytes", "chatglm2-tiny") / 2
    w8 = server.metric("llm_weight_bytes", "chatglm2-tiny-w8a16")
    assert 0 < w8 < dense, (dense, w8)
