// The seam between the attention side and the experts, and between the
// expert service and its compute.
//
// Each layer, the model runner groups the step's tokens by the expert they
// were routed to and hands the groups to an ExpertBackend, which fills in the
// expert outputs. LocalExpertBackend runs them in-process on the CPU,
// RemoteExpertBackend (gateway/) sends them to expert services over gRPC, and
// cuda::CudaExpertBackend runs them on a GPU. The expert service computes
// each Forward call through the same interface (Local or CUDA).
//
// Legend: N tokens routed to one expert, D hidden.
#ifndef SWITCHYARD_EXPERT_SERVICE_EXPERT_BACKEND_H_
#define SWITCHYARD_EXPERT_SERVICE_EXPERT_BACKEND_H_

#include <future>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/types/span.h"
#include "core/worker_pool.h"
#include "expert_service/expert_ffn.h"

namespace switchyard {

// The rows of one layer routed to one expert.
struct ExpertBatch {
  int expert = 0;
  int tokens = 0;                // N >= 1
  const float* input = nullptr;  // [N, D], the post-attention-normed hidden states
  float* output = nullptr;       // [N, D], written by the backend
};

// Thread-safety: implementations are thread-safe; several model runners may
// share one backend.
class ExpertBackend {
 public:
  ExpertBackend();
  // Joins the threads of the default StartLayerPerBatch (every future it
  // returned must be ready by now, see there).
  virtual ~ExpertBackend();
  ExpertBackend(const ExpertBackend&) = delete;
  ExpertBackend& operator=(const ExpertBackend&) = delete;
  // Fills every batch's output for `layer`. On error no output may be used.
  virtual absl::Status RunLayer(int layer, absl::Span<const ExpertBatch> batches) = 0;
  // Like RunLayer, but one expert's failure does not spoil the other batches:
  // (*batch_status)[i] (resized to batches.size()) is batch i's outcome, and
  // only the outputs of batches that are not OK are unusable. The returned
  // status is for errors that spoil the whole layer (a bad batch, a caller
  // bug). The model runners call this so that a failed expert call ends only
  // the sequences whose tokens it carried. Default: RunLayer, whose error
  // spoils the whole layer (every batch_status OK).
  virtual absl::Status RunLayerPerBatch(int layer, absl::Span<const ExpertBatch> batches,
                                        std::vector<absl::Status>* batch_status);
  // RunLayerPerBatch started in the background, so that a caller can compute
  // something else (another micro-batch's attention) while the experts run;
  // the future yields RunLayerPerBatch's return value. `batches`, the
  // buffers they point to and `batch_status` must stay valid until the
  // future is ready; wait on every future before they go away. Callers may
  // have several calls in flight at once, also for the same layer, and
  // every future must be ready before the backend is destroyed. Default:
  // RunLayerPerBatch on one of the backend's persistent worker threads
  // (started on first use, as many as calls were ever in flight at once, so
  // concurrent calls never wait for each other and no call starts a thread
  // once that peak is reached); a backend with its own asynchronous
  // transport may override it.
  virtual std::future<absl::Status> StartLayerPerBatch(int layer, std::vector<ExpertBatch> batches,
                                                       std::vector<absl::Status>* batch_status);
  // Whether each batch's output rows have the same bits whatever the
  // number of rows in the batch, for any number (cpu::RowsIndependentOfCount;
  // micro-batches of more than gateway/step_runner.h's
  // kMaxMicroBatchedStepTokens tokens rely on it). Default: false, which
  // promises that only up to cpu::kSkinnyMaxTokens rows.
  virtual bool RowsIndependentOfCount() const { return false; }
  // Threads the default StartLayerPerBatch has started so far (0 before its
  // first call): the peak of its calls in flight at once.
  int layer_call_threads() const;
  // One line for logs: what runs the experts.
  virtual std::string Describe() const = 0;

 private:
  WorkerPool layer_calls_;  // the default StartLayerPerBatch's; no thread before its first call
};

// Runs experts from an in-process ExpertStore on the CPU: the gateway's
// `--experts local`, the expert service's `--device cpu`, and the oracle for
// the other backends. A layer with several experts splits whole experts over
// the OpenMP team (one fork/join per layer); a single expert splits its
// products' rows instead (cpu::Linear).
class LocalExpertBackend : public ExpertBackend {
 public:
  explicit LocalExpertBackend(const ExpertStore* store);
  absl::Status RunLayer(int layer, absl::Span<const ExpertBatch> batches) override;
  // True when every expert of the store is BF16 and the CPU kernels in force
  // keep rows independent of their count (cpu::RowsIndependentOfCount).
  bool RowsIndependentOfCount() const override;
  // Names the CPU kernel level and precision (cpu::KernelDescription).
  std::string Describe() const override;

 private:
  const ExpertStore* store_;
  bool bf16_weights_ = true;  // every expert of store_
};

}  // namespace switchyard

#endif  // SWITCHYARD_EXPERT_SERVICE_EXPERT_BACKEND_H_
