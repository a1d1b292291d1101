#!/usr/bin/env python3
"""A second-language client of the Generation API, built from the .proto files only.

Generates Python stubs from protos/switchyard/v1/*.proto into a temporary
directory, then checks a running gateway: GetModelInfo, Generate, GenerateStream
(against Generate), Tokenize/Detokenize, and that a bad request is
INVALID_ARGUMENT.

usage: python_client_test.py [GATEWAY_ADDR] [--protos DIR]
  GATEWAY_ADDR defaults to $SWITCHYARD_GATEWAY; DIR to the repository's protos/.
Exits non-zero on the first failed check.
"""

import argparse
import glob
import importlib
import os
import shutil
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_PROTOS = os.path.normpath(os.path.join(HERE, "..", "..", "protos"))
PROMPT = "The quick brown fox"
MAX_NEW_TOKENS = 8


class CheckFailed(Exception):
    pass


def check(condition, message):
    if not condition:
        raise CheckFailed(message)


def generate_stubs(protos_dir, out_dir):
    """Compiles protos_dir/switchyard/v1/*.proto into out_dir, as the README says.

    With the system protoc and grpc_python_plugin (Debian 12:
    protobuf-compiler and protobuf-compiler-grpc), not `python -m
    grpc_tools.protoc`: Debian 12's python3-grpc-tools bundles protoc 3.5, which
    rejects proto3 `optional`.
    """
    protos = sorted(glob.glob(os.path.join(protos_dir, "switchyard", "v1", "*.proto")))
    check(protos, f"no .proto files under {protos_dir}/switchyard/v1")
    protoc = shutil.which("protoc")
    plugin = shutil.which("grpc_python_plugin")
    check(protoc and plugin, "need protoc and grpc_python_plugin "
          "(apt-get install protobuf-compiler protobuf-compiler-grpc)")
    cmd = [protoc, "-I", protos_dir, f"--python_out={out_dir}",
           f"--grpc_python_out={out_dir}", f"--plugin=protoc-gen-grpc_python={plugin}"] + protos
    result = subprocess.run(cmd, capture_output=True, text=True)
    check(result.returncode == 0,
          f"could not generate Python stubs ({' '.join(cmd)}):\n{result.stderr.strip()[:2000]}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("gateway", nargs="?", default=os.environ.get("SWITCHYARD_GATEWAY"))
    parser.add_argument("--protos", default=DEFAULT_PROTOS)
    args = parser.parse_args()
    if not args.gateway:
        parser.error("give the gateway address as an argument or in $SWITCHYARD_GATEWAY")

    import grpc  # Imported here so --help works without grpcio.

    stub_dir = tempfile.mkdtemp(prefix="switchyard_py_stubs_")
    try:
        generate_stubs(args.protos, stub_dir)
        sys.path.insert(0, stub_dir)
        pb = importlib.import_module("switchyard.v1.generation_pb2")
        pb_grpc = importlib.import_module("switchyard.v1.generation_pb2_grpc")
        run_checks(grpc, pb, pb_grpc, args.gateway)
    finally:
        shutil.rmtree(stub_dir, ignore_errors=True)


def run_checks(grpc, pb, pb_grpc, address):
    channel = grpc.insecure_channel(address)
    grpc.channel_ready_future(channel).result(timeout=30)
    stub = pb_grpc.GenerationServiceStub(channel)
    timeout = 60

    # GetModelInfo.
    info = stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=timeout)
    check(info.vocab_size > 0, f"vocab_size is {info.vocab_size}")
    check(info.num_layers > 0 and info.num_experts > 0, f"bad model info: {info}")
    check(0 < info.experts_per_token <= info.num_experts, f"bad experts_per_token: {info}")
    check(info.max_new_tokens_limit >= MAX_NEW_TOKENS, f"max_new_tokens_limit: {info}")
    check(info.config_fingerprint, "empty config_fingerprint")
    print(f"GetModelInfo: {info.architecture} vocab={info.vocab_size} layers={info.num_layers} "
          f"experts={info.num_experts} top-{info.experts_per_token}")

    # Tokenize: what Generate should report as the prompt.
    tokens = stub.Tokenize(pb.TokenizeRequest(text=PROMPT), timeout=timeout)
    check(len(tokens.token_ids) > 0, "Tokenize returned no ids")
    check(len(tokens.tokens) == len(tokens.token_ids), "Tokenize: tokens not parallel to ids")

    # Generate, greedy, exactly MAX_NEW_TOKENS tokens.
    request = pb.GenerateRequest(
        text=PROMPT,
        sampling=pb.SamplingParameters(temperature=0.0),
        stopping=pb.StoppingCriteria(max_new_tokens=MAX_NEW_TOKENS, ignore_eos=True),
        request_id="python-client-test",
    )
    unary = stub.Generate(request, timeout=timeout)
    check(len(unary.token_ids) == MAX_NEW_TOKENS,
          f"Generate: {len(unary.token_ids)} token ids, want {MAX_NEW_TOKENS}")
    check(unary.finish_reason == pb.FINISH_REASON_LENGTH,
          f"Generate: finish_reason {pb.FinishReason.Name(unary.finish_reason)}, want LENGTH")
    check(unary.usage.completion_tokens == MAX_NEW_TOKENS,
          f"Generate: usage.completion_tokens {unary.usage.completion_tokens}")
    check(list(unary.prompt_token_ids) == list(tokens.token_ids),
          f"Generate: prompt_token_ids {list(unary.prompt_token_ids)} != Tokenize "
          f"{list(tokens.token_ids)}")
    check(unary.usage.prompt_tokens == len(unary.prompt_token_ids),
          f"Generate: usage.prompt_tokens {unary.usage.prompt_tokens} != "
          f"{len(unary.prompt_token_ids)}")
    check(unary.request_id == "python-client-test", f"request_id echo: {unary.request_id!r}")
    check(all(0 <= t < info.vocab_size for t in unary.token_ids), "token id out of range")
    print(f"Generate: {list(unary.token_ids)} {unary.text!r}")

    # Greedy is deterministic: the same request gives the same tokens.
    again = stub.Generate(request, timeout=timeout)
    check(list(again.token_ids) == list(unary.token_ids), "greedy Generate is not repeatable")

    # GenerateStream: the same completion in pieces.
    messages = list(stub.GenerateStream(request, timeout=timeout))
    check(messages, "GenerateStream sent no messages")
    joined = "".join(m.text_delta for m in messages)
    ids = [t for m in messages for t in m.token_ids]
    check(joined == unary.text, f"stream text {joined!r} != unary text {unary.text!r}")
    check(ids == list(unary.token_ids), f"stream ids {ids} != unary ids {list(unary.token_ids)}")
    last = messages[-1]
    check(last.finish_reason == pb.FINISH_REASON_LENGTH,
          f"stream: last finish_reason {pb.FinishReason.Name(last.finish_reason)}")
    check(last.HasField("usage"), "stream: last message has no usage")
    check(last.usage.completion_tokens == MAX_NEW_TOKENS
          and last.usage.prompt_tokens == unary.usage.prompt_tokens,
          f"stream: usage {last.usage} != {unary.usage}")
    for i, m in enumerate(messages[:-1]):
        check(m.finish_reason == pb.FINISH_REASON_UNSPECIFIED,
              f"stream: message {i} of {len(messages)} has a finish_reason")
        check(not m.HasField("usage"), f"stream: message {i} of {len(messages)} has usage")
    for m in messages:
        check(m.request_id == "python-client-test", f"stream request_id echo: {m.request_id!r}")
    # Deltas are whole characters: no replacement character that the unary
    # text does not have too (protobuf itself rejects invalid UTF-8 in strings).
    replacements = sum(m.text_delta.count("\ufffd") for m in messages)
    check(replacements <= unary.text.count("\ufffd"),
          f"stream deltas have {replacements} U+FFFD, unary text "
          f"{unary.text.count(chr(0xFFFD))}")
    print(f"GenerateStream: {len(messages)} messages, text matches")

    # Detokenize round trip of the prompt.
    detok = stub.Detokenize(pb.DetokenizeRequest(token_ids=tokens.token_ids), timeout=timeout)
    check(detok.text == PROMPT, f"Detokenize(Tokenize(x)) = {detok.text!r}, want {PROMPT!r}")

    # Bad requests: INVALID_ARGUMENT, unary and streaming.
    bad = pb.GenerateRequest(text=PROMPT, sampling=pb.SamplingParameters(temperature=-1.0))
    for name, call in [("Generate", lambda: stub.Generate(bad, timeout=timeout)),
                       ("GenerateStream", lambda: list(stub.GenerateStream(bad, timeout=timeout)))]:
        try:
            call()
        except grpc.RpcError as e:
            check(e.code() == grpc.StatusCode.INVALID_ARGUMENT,
                  f"{name}(temperature=-1): {e.code()} {e.details()}, want INVALID_ARGUMENT")
            print(f"{name}(temperature=-1): INVALID_ARGUMENT: {e.details()}")
        else:
            raise CheckFailed(f"{name}(temperature=-1) succeeded")
    channel.close()


if __name__ == "__main__":
    try:
        main()
    except CheckFailed as e:
        print(f"python_client_test: FAIL: {e}", file=sys.stderr)
        sys.exit(1)
    print("python_client_test: PASS")
