# The CUDA backend's sources, named once: cuda/CMakeLists.txt builds them
# with nvcc into switchyard_cuda, cuda/emulator/CMakeLists.txt builds the same
# files against the CPU emulator into switchyard_cuda_emulated.
#   SWITCHYARD_CUDA_KERNELS       cuda/kernels/<name>.cu, one kernel each
#   SWITCHYARD_CUDA_HOST_SOURCES  cuda/<file>: device plumbing, projections,
#                                 precision, weight uploads (the cuBLAS
#                                 loader, cublas_api.cc, is separate: the
#                                 emulator brings its own)
set(SWITCHYARD_CUDA_KERNELS attention bf16_to_f32 embedding_lookup f32_to_bf16 gather_rows
  kv_append moe_combine residual_add rms_norm rope_rotate_half router_topk swiglu)
set(SWITCHYARD_CUDA_HOST_SOURCES device.cc linear.cc precision.cc upload.cc)
