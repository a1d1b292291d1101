#include "cli/command_specs.h"

#include <cstdlib>

#include "absl/strings/str_cat.h"

namespace switchyard::cli {
namespace {

std::vector<FlagSpec> SamplingFlags() {
  return {
      {"max-new-tokens", true, "16", "tokens to generate at most"},
      {"temperature", true, "0: greedy", "sampling temperature"},
      {"top-p", true, "1", "nucleus sampling: keep the smallest set of tokens with this mass"},
      {"top-k", true, "0: off", "keep only the K most likely tokens"},
      {"min-p", true, "0: off", "drop tokens less likely than P times the most likely one"},
      {"repetition-penalty", true, "1: off", "divide the logits of tokens seen so far by R"},
      {"presence-penalty", true, "0", "subtract P from the logits of generated tokens"},
      {"frequency-penalty", true, "0", "subtract F times a token's count so far from its logit"},
      {"seed", true, "random", "sampling seed, for reproducible samples"},
      {"stop-token-id", true, "the model's EOS", "stop at these token ids (comma-separated)"},
      {"ignore-eos", false, "", "keep generating past the end-of-sequence token"},
      {"json", false, "", "print one JSON object instead of the text"},
  };
}

std::vector<FlagSpec> ClientSecurityFlags() {
  return {
      {"tls-ca", true, "plaintext", "connect over TLS, verifying the server against this CA (PEM)"},
      {"tls-cert", true, "", "client certificate for mutual TLS (PEM, with --tls-key)"},
      {"tls-key", true, "", "client private key for mutual TLS (PEM, with --tls-cert)"},
      {"auth-token-file", true, "no token",
       "send 'authorization: Bearer TOKEN', TOKEN the file's first line"},
  };
}

std::vector<FlagSpec> Join(std::vector<FlagSpec> a, const std::vector<FlagSpec>& b) {
  a.insert(a.end(), b.begin(), b.end());
  return a;
}

std::vector<Subcommand> Build() {
  const FlagSpec model = {"model", true, "required", "model directory (config.json, weights)"};
  const FlagSpec server = {"server", true, "", "the gateway, HOST:PORT (selects the remote form)"};
  const FlagSpec timeout = {"timeout-ms", true, "0: none", "deadline of the call"};
  const FlagSpec messages = {
      "messages", true, "",
      "the prompt as a chat: JSON [{\"role\": ..., \"content\": ...}, ...], or @FILE holding it; "
      "rendered with the chat template (the gateway's with --server), generation prompt added"};
  std::vector<Subcommand> out;
  out.push_back(
      {"generate",
       "generate text, locally or from a gateway (--server)",
       {{"switchyard generate",
         "switchyard generate --model DIR (--prompt TEXT | --messages JSON_OR_@FILE) [FLAGS]   (in "
         "this process)",
         Join({model,
               {"prompt", true, "", "the prompt text (or --messages)"},
               messages,
               {"chat-template", true, "the model's tokenizer_config.json chat_template",
                "Jinja chat template file that renders --messages"}},
              SamplingFlags()),
         ""},
        {"switchyard generate --server",
         "switchyard generate --server HOST:PORT (--prompt TEXT | --token-ids 1,2,3 | --messages "
         "JSON_OR_@FILE) [FLAGS]",
         Join(Join({server,
                    {"prompt", true, "", "the prompt text (or --token-ids, --messages)"},
                    {"token-ids", true, "", "the prompt as token ids, comma-separated"},
                    messages},
                   SamplingFlags()),
              Join({{"stop", true, "none", "stop when the text contains STR (repeatable)"},
                    {"stream", false, "true",
                     "stream tokens as they come (--stream=false: one "
                     "reply)"},
                    timeout,
                    {"logprobs", true, "0: none", "return the top N log-probabilities per token"},
                    {"request-id", true, "the server's", "the request id for logs and traces"}},
                   ClientSecurityFlags())),
         ""}}});
  out.push_back(
      {"tokenize",
       "print the token ids of a text",
       {{"switchyard tokenize",
         "switchyard tokenize --model DIR --text TEXT",
         {model, {"text", true, "required", "the text to tokenize"}},
         ""},
        {"switchyard tokenize --server",
         "switchyard tokenize --server HOST:PORT --text TEXT [FLAGS]",
         Join({server,
               {"text", true, "required", "the text to tokenize"},
               {"add-special-tokens", false, "true", "add BOS (--add-special-tokens=false: not)"},
               timeout},
              ClientSecurityFlags()),
         ""}}});
  out.push_back({"health",
                 "exit 0 when a server reports SERVING (for exec probes)",
                 {{"switchyard health", "switchyard health --server HOST:PORT [FLAGS]",
                   Join({{"server", true, "required", "the server, HOST:PORT"},
                         {"service", true, "'': the whole server", "the service name to check"},
                         {"timeout-ms", true, "5000", "deadline of the check"}},
                        ClientSecurityFlags()),
                   ""}}});
  out.push_back(
      {"up",
       "run the experts and a gateway on this machine as child processes",
       {{"switchyard up",
         "switchyard up --model DIR --port P [FLAGS]",
         {model,
          {"port", true, "required", "the gateway's port (0 picks one)"},
          {"http-port", true, "none",
           "also serve the OpenAI-compatible HTTP API on this port (the gateway's --http-listen)"},
          {"endpoints-file", true, "none", "write the expert endpoints (JSON topology) here"},
          {"experts-per-process", true, "1", "experts served by each switchyard-expert"},
          {"bin-dir", true, "this binary's folder", "where switchyard-expert/-gateway are"},
          {"listen-host", true, "127.0.0.1", "the host every process listens on"},
          {"start-timeout-s", true, "300", "give up when not every process is ready by then"},
          {"expert-workers", true, "2", "--workers of every expert"},
          {"kv-cache-tokens", true, "from --kv-cache-memory", "the gateway's --kv-cache-tokens"},
          {"kv-cache-memory", true, "50% of MemAvailable",
           "the gateway's --kv-cache-memory (e.g. 2GiB, 512MiB)"},
          {"kv-cache-dtype", true, "auto", "the gateway's --kv-cache-dtype: auto, bf16 or f32"},
          {"max-queue", true, "256", "the gateway's --max-queue"},
          {"max-step-tokens", true, "512", "the gateway's --max-step-tokens"},
          {"max-new-tokens-limit", true, "0: context - 1", "the gateway's --max-new-tokens-limit"},
          {"micro-batches", true, "0: auto", "the gateway's --micro-batches"},
          {"expert-arg", true, "none", "one more argument for every expert (repeatable)"},
          {"gateway-arg", true, "none", "one more argument for the gateway (repeatable)"},
          {"device", true, "cpu", "cpu or cuda, for every process"},
          {"precision", true, "bf16 on cuda", "bf16 or f32 (cuda), for every process"},
          {"max-restarts", true, "5",
           "restarts of one process within 60 s before up gives up (0..1000)"},
          {"autoscale", false, "off",
           "scale each expert's replicas on its busy ratio with the Kubernetes HPA rule "
           "(README, \"Autoscaling hot experts\"); needs --experts-per-process 1"},
          {"min-replicas", true, "1", "--autoscale: replicas per expert at least (and at start)"},
          {"max-replicas", true, "max(4, --min-replicas)",
           "--autoscale: replicas per expert at most"},
          {"target-busy", true, "0.7",
           "--autoscale: the busy ratio to scale to, per worker thread: a replica is scaled "
           "towards --expert-workers x this busy seconds per second (rate of "
           "switchyard_expert_busy_seconds_total), as the manifests' busy threshold"},
          {"scale-down-delay-s", true, "300",
           "--autoscale: scale down only to the largest count asked for over this window"},
          {"autoscale-period-ms", true, "15000", "--autoscale: how often to scrape and decide"},
          {"metrics-port", true, "none",
           "serve up's own /metrics (the autoscaler's replica counts) on this port (0 picks)"},
          {"gpus", true, "0",
           "--device cuda: the GPUs experts go on, e.g. 0,1 (first replicas in turn; new "
           "replicas on the one with the most free memory)"}},
         ""}}});
  out.push_back({"bench",
                 "closed-loop streaming load against a gateway; latency and throughput",
                 {{"switchyard bench", "switchyard bench --server HOST:PORT [FLAGS]",
                   Join({{"server", true, "required", "the gateway, HOST:PORT"},
                         {"concurrency", true, "8", "requests in flight at once (1..4096)"},
                         {"requests", true, "32", "requests in all"},
                         {"prompt-tokens", true, "64", "random prompt tokens per request"},
                         {"output-tokens", true, "32", "tokens generated per request"},
                         {"shared-prefix-tokens", true, "0",
                          "tokens every prompt starts with (then --prompt-tokens of its own); "
                          "request 0 runs alone first; reports TTFT first vs later and prefix "
                          "hits (--metrics)"},
                         {"max-new-tokens", true, "--output-tokens",
                          "max_new_tokens each request declares; above --output-tokens, streams "
                          "are cancelled after --output-tokens tokens"},
                         {"seed", true, "0", "seed of the random prompts"},
                         {"timeout-ms", true, "0: none", "deadline of each request"},
                         {"request-rate", true, "0: closed loop",
                          "requests started per second (open loop, at most --concurrency at "
                          "once)"},
                         {"metrics", true, "none",
                          "the gateway's /metrics HOST:PORT: print the per-hop expert breakdown "
                          "and routed-token shares"},
                         {"skew", false, "", "skewed workload on expert 0 (see --skew-experts)"},
                         {"skew-experts", true, "none",
                          "E,..: prompts of the tokens the router sends most to these experts "
                          "(probed through --metrics before the run)"},
                         {"skew-candidates", true, "64", "token ids probed for --skew"},
                         {"skew-pool", true, "8", "hottest probed tokens the skewed prompts use"},
                         {"json", false, "", "print the results as JSON"}},
                        ClientSecurityFlags()),
                   ""}}});
  out.push_back({"chat-template",
                 "render a conversation with a model's chat template",
                 {{"switchyard chat-template",
                   "switchyard chat-template (--model DIR | --template FILE) --messages FILE.json",
                   {{"model", true, "", "use this model's tokenizer_config.json chat_template"},
                    {"template", true, "", "a Jinja chat template file (instead of --model)"},
                    {"messages", true, "required", "JSON file: [{\"role\":..., \"content\":...}]"},
                    {"add-generation-prompt", false, "", "end with the assistant turn's start"},
                    {"json", false, "", "print {\"text\": ...} instead of the text"}},
                   ""}}});
  out.push_back(
      {"make-model",
       "write a random-weight model (tests, benchmarks)",
       {{"switchyard make-model",
         "switchyard make-model --preset tiny|bench|mixtral-8x7b --out DIR [FLAGS]",
         {{"preset", true, "required", "the shape: tiny, bench or mixtral-8x7b"},
          {"out", true, "required", "the directory to write"},
          {"layers", true, "the preset's", "number of layers"},
          {"seed", true, "0", "seed of the random weights"},
          {"dtype", true, "bf16", "weight type: bf16, f16 or f32"},
          {"shard-size-mb", true, "2048", "largest safetensors shard"},
          {"tokenizer-dir", true, "a generated byte tokenizer", "copy the tokenizer from here"}},
         ""}}});
  return out;
}

}  // namespace

const std::vector<Subcommand>& Subcommands() {
  static const std::vector<Subcommand>* commands = new std::vector<Subcommand>(Build());
  return *commands;
}

const Subcommand* FindSubcommand(const std::string& name) {
  for (const Subcommand& c : Subcommands()) {
    if (c.name == name) return &c;
  }
  return nullptr;
}

const std::vector<FlagSpec>& FormFlags(const std::string& name, bool remote) {
  const Subcommand* c = FindSubcommand(name);
  if (c == nullptr) std::abort();  // A programming error: names are constants.
  return c->forms[remote && c->forms.size() > 1 ? 1 : 0].flags;
}

std::string SubcommandHelp(const Subcommand& command) {
  std::string out = absl::StrCat("switchyard ", command.name, ": ", command.summary, "\n");
  for (const CommandSpec& form : command.forms) absl::StrAppend(&out, "\n", HelpText(form));
  return out;
}

}  // namespace switchyard::cli
