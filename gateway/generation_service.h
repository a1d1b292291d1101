// The public Generation API (switchyard.v1.GenerationService) over a
// Scheduler, with gRPC's callback API.
//
// Generate and GenerateStream validate the request (INVALID_ARGUMENT naming
// the field), submit it to the scheduler (RESOURCE_EXHAUSTED when the queue is
// full) and answer from the scheduler's events. A client that cancels or whose
// deadline passes has its request cancelled, and its KV cache freed, at the
// next step boundary.
//
// Thread-safety: thread-safe; gRPC calls it from many threads.
#ifndef SWITCHYARD_GATEWAY_GENERATION_SERVICE_H_
#define SWITCHYARD_GATEWAY_GENERATION_SERVICE_H_

#include <functional>
#include <string>
#include <vector>

#include "core/chat_template.h"
#include "core/model_config.h"
#include "core/tokenizer.h"
#include "gateway/gateway_metrics.h"
#include "gateway/request_validation.h"
#include "gateway/scheduler.h"
#include "switchyard/v1/generation.grpc.pb.h"

namespace switchyard {

struct GenerationServiceOptions {
  std::string model_name;  // reported by GetModelInfo
  RequestLimits limits;
  std::vector<v1::ExpertRoute> expert_routes;  // reported by GetModelInfo
  // When set, GetModelInfo reports what this returns instead (the live
  // routes of a topology that can change); called on gRPC threads, so it
  // must be thread-safe. Default: none.
  std::function<std::vector<v1::ExpertRoute>()> live_expert_routes;
  GatewayMetrics* metrics = nullptr;  // requests by outcome; not owned
  // Renders `messages` prompts; not owned. nullptr (default): such requests
  // get FAILED_PRECONDITION.
  const ChatTemplate* chat_template = nullptr;
};

class GenerationServiceImpl final : public v1::GenerationService::CallbackService {
 public:
  GenerationServiceImpl(Scheduler* scheduler, const Tokenizer* tokenizer, const ModelConfig& config,
                        GenerationServiceOptions options);

  grpc::ServerUnaryReactor* Generate(grpc::CallbackServerContext* context,
                                     const v1::GenerateRequest* request,
                                     v1::GenerateResponse* response) override;
  grpc::ServerWriteReactor<v1::GenerateStreamResponse>* GenerateStream(
      grpc::CallbackServerContext* context, const v1::GenerateRequest* request) override;
  grpc::ServerUnaryReactor* Tokenize(grpc::CallbackServerContext* context,
                                     const v1::TokenizeRequest* request,
                                     v1::TokenizeResponse* response) override;
  grpc::ServerUnaryReactor* Detokenize(grpc::CallbackServerContext* context,
                                       const v1::DetokenizeRequest* request,
                                       v1::DetokenizeResponse* response) override;
  grpc::ServerUnaryReactor* GetModelInfo(grpc::CallbackServerContext* context,
                                         const v1::GetModelInfoRequest* request,
                                         v1::ModelInfo* response) override;

 private:
  Scheduler* scheduler_;
  const Tokenizer* tokenizer_;
  ModelConfig config_;
  GenerationServiceOptions options_;
};

}  // namespace switchyard

#endif  // SWITCHYARD_GATEWAY_GENERATION_SERVICE_H_
