#!/usr/bin/env python3
"""Writes the seed corpora in fuzz/corpus/<target>/ (committed; rerun after
changing this script). Seeds it does not write (a finding's reproducer kept
as a regression seed) stay. Standard library only: the GenerateRequest seeds are
encoded by hand in the protobuf wire format of protos/switchyard/v1/generation.proto.

Usage: python3 fuzz/make_seeds.py
"""
import json
import os
import struct

HERE = os.path.dirname(os.path.abspath(__file__))
CORPUS = os.path.join(HERE, "corpus")


def write(target, name, data):
    d = os.path.join(CORPUS, target)
    os.makedirs(d, exist_ok=True)
    if isinstance(data, str):
        data = data.encode("utf-8")
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)


# --- tokenizer_fuzzer: text; the same bytes are also read as token ids
# (first byte: flags, then 2 bytes per id; top 2 bits 00 = byte token <0xNN>,
# 01 = small id (b % 16) - 4, else an id anywhere in the vocabulary).
def ids_seed(flags, pairs):
    return bytes([flags]) + b"".join(bytes(p) for p in pairs)


def tokenizer_seeds():
    t = "tokenizer_fuzzer"
    write(t, "hello", "Hello world")
    write(t, "sentence", "The capital of France is Paris.\nIt is known for the Eiffel Tower.")
    write(t, "special_tokens", "<s>a</s>b<unk> <s> c")
    write(t, "unicode", "h\u00e9llo \u65e5\u672c\u8a9e \U0001F642 \u0394x \u2581already")
    write(t, "spaces", "   leading\t\ttabs  and   runs   ")
    write(t, "invalid_utf8", b"ab\xff\xfe\xc3(\xe2\x82 \xf0\x9f\x98")
    # BOS, the bytes of U+00E9 (valid run), then of a truncated 3-byte char, then EOS.
    write(t, "ids_byte_runs", ids_seed(0x06, [(0x40, 5), (0x00, 0xC3), (0x00, 0xA9), (0x80, 0x40),
                                              (0x00, 0xE2), (0x00, 0x82), (0x40, 6)]))
    # Ids out of range (negative and just past the vocabulary), with skip set.
    write(t, "ids_out_of_range", ids_seed(0x01, [(0x40, 0), (0xFD, 0x00), (0x40, 3), (0xBD, 0x07)]))


# --- safetensors_fuzzer: whole files.
def safetensors_file(tensors, metadata=None, pad=True, data_extra=b""):
    """tensors: list of (name, dtype, shape, data bytes)."""
    header = {}
    if metadata is not None:
        header["__metadata__"] = metadata
    offset = 0
    blob = b""
    for name, dtype, shape, data in tensors:
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + len(data)]}
        offset += len(data)
        blob += data
    h = json.dumps(header, separators=(",", ":")).encode()
    if pad:
        h += b" " * ((8 - (8 + len(h)) % 8) % 8)
    return struct.pack("<Q", len(h)) + h + blob + data_extra


def safetensors_seeds():
    t = "safetensors_fuzzer"
    f32 = struct.pack("<6f", 1, 2, 3, 4, 5, 6)
    bf16 = bytes(range(8))
    write(t, "two_tensors", safetensors_file(
        [("model.embed_tokens.weight", "F32", [2, 3], f32), ("model.norm.weight", "BF16", [4], bf16)],
        metadata={"format": "pt"}))
    write(t, "all_dtypes", safetensors_file(
        [("a", "F16", [2], b"\0" * 4), ("b", "I32", [1, 1], b"\1" * 4), ("c", "I64", [], b"\2" * 8),
         ("d", "F32", [0, 5], b"")], metadata={"k": "v", "n": "1"}))
    write(t, "empty_header", safetensors_file([], pad=False))
    whole = safetensors_file([("x", "F32", [2], struct.pack("<2f", 1, 2))])
    write(t, "truncated", whole[:-3])
    write(t, "overlap", struct.pack("<Q", 120) + json.dumps(
        {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
         "b": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}},
        separators=(",", ":")).encode().ljust(120) + b"\0" * 8)


# --- request_validation_fuzzer: serialized switchyard.v1.GenerateRequest.
def varint(n):
    n &= (1 << 64) - 1
    out = b""
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out += bytes([b | 0x80])
        else:
            return out + bytes([b])


def field_varint(num, v):
    return varint(num << 3) + varint(v)


def field_bytes(num, data):
    if isinstance(data, str):
        data = data.encode("utf-8")
    return varint(num << 3 | 2) + varint(len(data)) + data


def field_float(num, v):
    return varint(num << 3 | 5) + struct.pack("<f", v)


def packed(ids):
    return b"".join(varint(i) for i in ids)


def request_seeds():
    t = "request_validation_fuzzer"
    # GenerateRequest: text=1, token_ids=2 (TokenIds: ids=1), sampling=3,
    # stopping=4, return_logprobs=5, top_logprobs=6, request_id=7.
    write(t, "text", field_bytes(1, "The capital of France is"))
    write(t, "token_ids", field_bytes(2, field_bytes(1, packed([1, 415, 5565, 302, 4843, 349]))) +
          field_bytes(4, field_varint(1, 8)))
    sampling = (field_float(1, 0.7) + field_float(2, 0.9) + field_varint(3, 40) +
                field_float(4, 0.05) + field_float(5, 1.1) + field_float(6, 0.5) +
                field_float(7, -0.5) + field_varint(8, 1234))
    stopping = (field_varint(1, 32) + field_bytes(2, ".") + field_bytes(2, "\n\n") +
                field_bytes(3, packed([2, 13])) + field_varint(4, 1))
    write(t, "everything", field_bytes(1, "Once upon a time") + field_bytes(3, sampling) +
          field_bytes(4, stopping) + field_varint(5, 1) + field_varint(6, 3) +
          field_bytes(7, "req-1"))
    write(t, "bad_values", field_bytes(2, field_bytes(1, packed([1, 32000, -1]))) +
          field_bytes(3, field_float(1, -1.0) + field_float(2, 0.0)) +
          field_bytes(4, field_varint(1, 5000)) + field_varint(6, 50))


# --- chat_template_fuzzer: a template's source, NUL, the render's JSON input
# (an array of messages, or an object of variables). The fixture templates of
# tests/data/chat-templates with two of their conversations, and each
# extra-references construct with its variables.
def chat_template_seeds():
    t = "chat_template_fuzzer"
    templates = os.path.join(HERE, "..", "tests", "data", "chat-templates")
    refs = json.load(open(os.path.join(templates, "references.json")))
    conversations = refs["conversations"]
    for name in sorted(os.listdir(templates)):
        if not name.endswith(".jinja"):
            continue
        source = open(os.path.join(templates, name), encoding="utf-8").read()
        for i in (1, 3):
            write(t, "%s-%d" % (name[:-len(".jinja")], i),
                  source + "\0" + json.dumps(conversations[i]))
    extra = json.load(open(os.path.join(templates, "extra-references.json")))
    for case in extra["cases"]:
        write(t, "extra-" + case["name"], case["template"] + "\0" + json.dumps(extra["variables"]))
    write(t, "no-input", "{{ bos_token }}{% for m in messages %}{{ m.content | upper }}{% endfor %}")
    write(t, "syntax-error", "{% for m in messages %}{{ m.content \0[]")


# --- openai_request_fuzzer: the first byte picks the endpoint (0 completions,
# 1 chat completions), the rest is the JSON body.
def openai_seeds():
    t = "openai_request_fuzzer"
    completions, chat = b"\x00", b"\x01"
    def body(obj):
        return json.dumps(obj).encode("utf-8")
    write(t, "completion", completions + body({"model": "m", "prompt": "The capital of France is",
                                               "max_tokens": 8}))
    write(t, "completion-everything", completions + body({
        "model": "m", "prompt": [1, 415, 5565], "max_tokens": 16, "temperature": 0.7,
        "top_p": 0.9, "stop": [".", "\n"], "seed": 3, "logprobs": 2, "stream": True,
        "stream_options": {"include_usage": True}, "frequency_penalty": 0.5,
        "presence_penalty": -0.5, "user": "u"}))
    write(t, "completion-bad", completions + body({"model": "m", "prompt": "x", "n": 2,
                                                   "max_tokens": -1, "top_p": 2}))
    write(t, "chat", chat + body({"model": "m", "messages": [
        {"role": "system", "content": "Be terse."}, {"role": "user", "content": "Hello!"}]}))
    write(t, "chat-everything", chat + body({
        "model": "m", "messages": [{"role": "user", "content": [{"type": "text", "text": "Hi"}]},
                                   {"role": "assistant", "content": "Hello"},
                                   {"role": "user", "content": "Again"}],
        "max_completion_tokens": 4, "logprobs": True, "top_logprobs": 2, "stop": "\n",
        "temperature": 0, "stream": True}))
    write(t, "chat-bad", chat + body({"model": "m", "messages": [{"role": "user"}],
                                      "tools": [], "logprobs": 3}))
    write(t, "not-json", completions + b'{"model": "m", "prompt": ')


# --- expert_frame_fuzzer: a magic byte (even: version 1, odd: version 2),
# then the frame's payload: a serialized switchyard.v1.ForwardStreamRequest
# (protos/switchyard/v1/expert.proto, tensor.proto), after its length and
# followed by the tail in version 2.
def tensor(dtype, shape, data=None, tail_offset=None):
    t = field_varint(1, dtype) + field_bytes(2, packed(shape))
    if data is not None:
        t += field_bytes(3, data)
    if tail_offset is not None:
        t += field_varint(4, tail_offset)
    return t


def batch(layer, expert, hidden_states):
    return field_varint(1, layer) + field_varint(2, expert) + field_bytes(3, hidden_states)


def frame_seeds():
    t = "expert_frame_fuzzer"
    f32 = struct.pack("<6f", 1.5, -2, 3, 0, 1e-3, 7)
    bf16 = bytes([0x80, 0x3F, 0x00, 0x40, 0x40, 0xC0])  # 1, 2, -3
    inline = (field_varint(1, 7) + field_bytes(2, batch(0, 1, tensor(1, [2, 3], data=f32))) +
              field_bytes(2, batch(0, 2, tensor(2, [1, 3], data=bf16))) + field_varint(3, 5000))
    write(t, "version1", b"\x00" + inline)
    in_tail = (field_varint(1, 8) + field_bytes(2, batch(0, 1, tensor(1, [2, 3], tail_offset=6))) +
               field_bytes(2, batch(0, 2, tensor(2, [1, 3], tail_offset=0))))
    write(t, "version2", b"\x01" + struct.pack("<I", len(in_tail)) + in_tail + bf16 + f32)
    past = field_bytes(2, batch(1, 3, tensor(1, [2, 3], tail_offset=4)))
    write(t, "version2_past_the_tail", b"\x01" + struct.pack("<I", len(past)) + past + f32)
    write(t, "version2_bad_length", b"\x01" + struct.pack("<I", 1000) + in_tail)


if __name__ == "__main__":
    tokenizer_seeds()
    safetensors_seeds()
    request_seeds()
    chat_template_seeds()
    openai_seeds()
    frame_seeds()
    total = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(CORPUS) for f in fs)
    print(f"seeds written to {CORPUS} ({total} bytes)")
